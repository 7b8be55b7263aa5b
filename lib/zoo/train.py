"""Train a bundled demo model and write its folder and model card.

    python -m lib.zoo.train code-lm --minutes 60
    python -m lib.zoo.train induction-2l
    python -m lib.zoo.train digits-cnn
    python -m lib.zoo.train digits-denoiser

Each run is seeded, shows a progress bar, saves checkpoints under `runs/` (a cut
run resumes from there), writes safetensors + config into `lib/zoo/<name>/` and
prints the metrics that go on the card.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import time
from pathlib import Path

import torch

from lib.zoo import ZOO, ZOO_DIR

REPO_ROOT = ZOO_DIR.parent.parent
NOT_METRICS = ("architecture", "usage")  # summary entries that are card text, not numbers


def _machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, no GPU"


def run_snippet(code: str) -> str:
    """What a card's usage snippet prints, run from the repository root as the card says."""
    out, cwd = io.StringIO(), os.getcwd()
    os.chdir(REPO_ROOT)
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "<model card snippet>", "exec"), {"__name__": "__main__"})
    finally:
        os.chdir(cwd)
    return out.getvalue()


def usage_section(code: str) -> str:
    """The card's "plain transformers" section: the snippet and what it printed."""
    return f"""## Use it with plain transformers

The folder is an ordinary Hugging Face checkpoint: no LayerScope code is needed. Called
with its defaults the tokenizer puts BOS (`<|endoftext|>`) first, as every training
sequence had it; `add_special_tokens=False` gives the bare tokens. From the repository
root:

```python
{code.strip()}
```

prints

```text
{run_snippet(code).strip()}
```

"""


def write_card(name: str, summary: dict, command: str, seed: int) -> None:
    """Write MODEL_CARD.md and metrics.json from a training summary (its "usage"
    entry, a snippet, is run and shown with its output)."""
    folder = ZOO_DIR / name
    entry = ZOO[name]
    metrics = {k: v for k, v in summary.items() if k not in NOT_METRICS}
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    rows = "\n".join(
        f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
        for k, v in metrics.items()
    )
    card = f"""# zoo:{name}

{entry.description}

## Architecture

{summary.get('architecture', '')}

{usage_section(summary['usage']) if 'usage' in summary else ''}## Data

{entry.data}

## Training

- command: `{command}`
- seed: {seed}
- machine: {_machine()}

## Measured metrics

| metric | value |
|---|---|
{rows}

These numbers are printed by the training command and re-checked (on a fast
subset) by `tests/test_zoo.py`.
"""
    (folder / "MODEL_CARD.md").write_text(card)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(ZOO))
    parser.add_argument("--minutes", type=float, default=None, help="time budget (code-lm)")
    parser.add_argument("--steps", type=int, default=None, help="exact step count (overrides --minutes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-dir", type=Path, default=Path("runs"))
    args = parser.parse_args()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    args.run_dir.mkdir(parents=True, exist_ok=True)
    out = ZOO_DIR / args.name
    t0 = time.time()
    if args.name == "code-lm":
        from lib.zoo import train_code_lm as mod
        summary = mod.train(out, args.minutes or 60.0, args.seed, args.steps, args.run_dir)
    elif args.name == "induction-2l":
        from lib.zoo import train_induction as mod
        summary = mod.train(out, args.seed, args.steps)
    else:
        from lib.zoo import train_digits as mod
        summary = mod.train(args.name, out, args.seed, args.steps)
    summary.setdefault("wall_minutes", (time.time() - t0) / 60)
    command = f"python -m lib.zoo.train {args.name} --seed {args.seed} --steps {summary['steps']}"
    write_card(args.name, summary, command, args.seed)
    print(json.dumps({k: v for k, v in summary.items() if k not in NOT_METRICS}, indent=2))


if __name__ == "__main__":
    main()
