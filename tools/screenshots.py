"""Screenshots of every page for a human look, and a new user's walk with bad input.

    python -m tools.screenshots                      # every bundled model x every page, then bad inputs
    python -m tools.screenshots zoo:code-lm /a/dir   # only these models (a zoo name or a folder)
    python -m tools.screenshots --all-pages          # every page in the navigation, not only the three

Starts `streamlit run app.py` headless on a free port, opens it in Chromium and saves
artifacts/walk/NN-<model>-<page>.png. The viewport is tall because Streamlit scrolls inside
its own container (a full-page shot would be cut at the window). Prints one line per step
with the number of tracebacks (`stException`) and the messages shown (error, warning, info),
also written to artifacts/walk/walk.log; exits 1 if any step showed a traceback.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from playwright.sync_api import TimeoutError as PlaywrightTimeout

from tools.serve import ROOT, app_server, chromium

OUT = ROOT / "artifacts" / "walk"
ZOO = ["zoo:code-lm", "zoo:induction-2l", "zoo:digits-cnn", "zoo:digits-denoiser"]
PAGES = ["Model", "Redundancy", "Glossary"]
TYPED_LABEL = "…or a Hugging Face name / local folder"
VIEWPORT = {"width": 1400, "height": 4000}
_APP = 'document.querySelector(\'[data-testid="stApp"]\')'
_NOT_RUNNING = f"() => {_APP}.getAttribute('data-test-script-state') === 'notRunning'"
# Sets window.__lsRan once the app's script state turns "running" after this call.
_WATCH_RUNS = f"""() => {{
    const app = {_APP};
    window.__lsRan = false;
    if (window.__lsObserver) window.__lsObserver.disconnect();
    window.__lsObserver = new MutationObserver(() => {{
        if (app.getAttribute('data-test-script-state') === 'running') window.__lsRan = true;
    }});
    window.__lsObserver.observe(app, {{attributes: true, attributeFilter: ['data-test-script-state']}});
}}"""


@dataclass
class Walk:
    """The browser page and what each step saw."""

    page: object
    lines: list[str] = field(default_factory=list)
    n: int = 0
    tracebacks: int = 0

    def act(self, action: Callable[[], None], timeout_s: float = 600) -> float:
        """Do `action` (a click, Enter) and wait for the script run it causes to end (plus a moment
        for plotly to draw); seconds waited. Waiting for "not running" alone is not enough: on a
        busy machine the rerun may start a second after the click, and the old state matches."""
        self.page.evaluate(_WATCH_RUNS)
        t0 = time.time()
        action()
        try:  # an action that changes nothing (the option already chosen) starts no run
            self.page.wait_for_function("() => window.__lsRan", timeout=20_000)
        except PlaywrightTimeout:
            pass
        self.page.wait_for_function(_NOT_RUNNING, timeout=timeout_s * 1000)
        self.page.wait_for_timeout(1500)
        return time.time() - t0

    def record(self, name: str, waited: float) -> None:
        """Screenshot and one log line: tracebacks, alerts, the page title."""
        self.n += 1
        path = OUT / f"{self.n:02d}-{name}.png"
        self.page.screenshot(path=str(path))
        exc = self.page.locator('[data-testid="stException"]').count()
        self.tracebacks += exc
        alerts = [a.inner_text().replace("\n", " ")[:300] for a in self.page.locator('[data-testid="stAlert"]').all()]
        titles = [h.inner_text() for h in self.page.locator("h1").all() if h.inner_text().strip()]
        line = f"{path.name}: {waited:.1f}s, tracebacks {exc}, title {titles}, alerts {alerts}"
        print(line, flush=True)
        self.lines.append(line)

    def sidebar(self):
        return self.page.locator('[data-testid="stSidebar"]')

    def load(self, spec: str) -> float:
        """Load `spec` as a user would: a bundled model from the list, anything else typed + Enter."""
        if spec in ZOO:
            self.sidebar().get_by_role("combobox", name="Bundled model").click()
            return self.act(self.page.get_by_role("option", name=spec).click)
        box = self.sidebar().get_by_role("textbox", name=TYPED_LABEL)
        box.fill(spec)
        return self.act(lambda: box.press("Enter"))

    def open(self, page_name: str) -> float:
        return self.act(self.page.get_by_role("link", name=page_name).click)

    def prompt(self, text: str) -> float:
        """Replace the Model page's prompt (Ctrl+Enter applies a text area)."""
        area = self.page.get_by_role("textbox", name="Prompt")
        area.fill(text)
        return self.act(lambda: area.press("Control+Enter"))

    def nav_pages(self) -> list[str]:
        """The page names in the sidebar's navigation, in order."""
        links = self.page.locator('[data-testid="stSidebarNav"] a').all()
        return [a.inner_text().split("\n")[-1].strip() for a in links]


def slug(spec: str) -> str:
    return spec.replace("zoo:", "").strip("/").replace("/", "_").replace(" ", "_")[-40:] or "empty"


def every_page(walk: Walk, spec: str, pages: list[str]) -> None:
    for name in pages:
        walk.record(f"{slug(spec)}-{name.lower().replace(' ', '-')}", walk.open(name))


def bad_inputs(walk: Walk, scratch: Path) -> None:
    """The bad inputs of issue 9's walk, each after a good model is loaded."""
    from tests.conftest import save_tiny_gpt2

    no_tok = scratch / "gpt2-no-tokenizer"
    save_tiny_gpt2(no_tok)
    for f in no_tok.iterdir():  # save_pretrained's files only: config and weights
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            f.unlink()
    walk.load("zoo:code-lm")
    walk.open("Model")
    for spec in [str(scratch / "does-not-exist"), "bad name !!"]:
        walk.record(f"bad-{slug(spec)}", walk.load(spec))
    walk.record("bad-gpt2-no-tokenizer", walk.load(str(no_tok)))
    every_page(walk, str(no_tok), PAGES)
    walk.load("zoo:code-lm")
    walk.open("Model")
    walk.record("prompt-empty", walk.prompt(""))
    walk.record("prompt-long", walk.prompt("def f(x):\n    return x + 1\n" * 400))
    walk.load("zoo:induction-2l")
    walk.record("prompt-unknown-words", walk.prompt("hello world 你好"))


def main(args: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tools.screenshots", description=__doc__.split("\n\n")[0],
                                     epilog="Screenshots go to artifacts/walk/ (the old ones are deleted first).")
    parser.add_argument("specs", nargs="*", metavar="MODEL", help="bundled names or folders (default: every bundled "
                        "model, then the bad inputs)")
    parser.add_argument("--all-pages", action="store_true", help="every page in the navigation, not only three")
    parsed = parser.parse_args(args)
    every, specs = parsed.all_pages, parsed.specs
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.png"):
        old.unlink()
    with app_server() as url, chromium() as browser, tempfile.TemporaryDirectory() as scratch:
        walk = Walk(browser.new_page(viewport=VIEWPORT))
        walk.page.goto(url)
        walk.page.get_by_role("heading", name="Model · zoo:code-lm").wait_for(timeout=300_000)
        walk.page.wait_for_function(_NOT_RUNNING, timeout=300_000)
        pages = walk.nav_pages() if every else PAGES
        for spec in specs or ZOO:
            if spec != "zoo:code-lm":
                walk.load(spec)
            every_page(walk, spec, pages)
        if not specs:
            bad_inputs(walk, Path(scratch))
        browser.close()
    (OUT / "walk.log").write_text("\n".join(walk.lines) + "\n")
    print(f"{walk.n} screenshots in {OUT}, {walk.tracebacks} traceback(s)")
    return 1 if walk.tracebacks else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
