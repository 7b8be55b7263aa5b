"""python -m bench: one row per measurement, `name  ratio  detail`."""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench import common, foundation, redundancy  # noqa: E402

SUITES = {"foundation": foundation.rows, "redundancy": redundancy.rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("suites", nargs="*", help=f"any of {', '.join(SUITES)} (default: all)")
    parser.add_argument("--layers", type=int, default=12)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    handle = common.gpt2_small(args.layers)
    batch = common.random_batch()
    print(f"{'name':<44} {'ratio':>7}  detail   (GPT-2-small shape, {args.layers} layers, "
          f"{torch.get_num_threads()} threads)")
    for name in args.suites or SUITES:
        for row in SUITES[name](handle, batch):
            print(row.line(), flush=True)


if __name__ == "__main__":
    main()
