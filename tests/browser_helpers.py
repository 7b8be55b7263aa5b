"""What every Chromium test shares: Debian's Chromium (a skip where it is missing, a
failure in CI, where `.ci/run` installs it), a headless browser on it, waiting until the
script run an action started has finished, and a metric's value as drawn."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from tools import serve
from tools.serve import CHROMIUM

SLOW = 300_000  # ms: a first visit and each lab change run full forwards on a shared CPU


def require_chromium() -> None:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing: .ci/run should have installed it")
        pytest.skip("Chromium is not installed (apt-get install -y chromium)")


@contextmanager
def chromium() -> Iterator[object]:
    """A headless Chromium (playwright's Browser), closed afterwards; a skip or a failure without it."""
    require_chromium()
    with serve.chromium() as browser:
        yield browser


def idle(page) -> None:
    """Wait until the script run the last action started has finished."""
    page.wait_for_timeout(300)
    page.locator('[data-testid="stApp"][data-test-script-state="notRunning"]').wait_for(timeout=SLOW)


def metric(page, label: str) -> str:
    box = page.locator('[data-testid="stMetric"]').filter(has_text=label).first
    return box.locator('[data-testid="stMetricValue"]').inner_text()
