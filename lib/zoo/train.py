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
import json
import os
import platform
import time
from pathlib import Path

import torch

from lib.zoo import ZOO, ZOO_DIR


def _machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, no GPU"


def write_card(name: str, summary: dict, command: str, seed: int) -> None:
    """Write MODEL_CARD.md and metrics.json from a training summary."""
    folder = ZOO_DIR / name
    entry = ZOO[name]
    metrics = {k: v for k, v in summary.items() if k not in ("architecture",)}
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    rows = "\n".join(
        f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
        for k, v in metrics.items()
    )
    card = f"""# zoo:{name}

{entry.description}

## Architecture

{summary.get('architecture', '')}

## Data

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
    print(json.dumps({k: v for k, v in summary.items() if k != "architecture"}, indent=2))


if __name__ == "__main__":
    main()
