"""python -m bench: one row per measurement, `name  ratio ±spread  detail`."""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench import (  # noqa: E402
    allocation,
    channels,
    common,
    exits,
    foundation,
    interpreter,
    lab,
    memory,
    pages,
    quantization,
    redundancy,
    representations,
    warm,
)

SUITES = {"foundation": foundation.ROWS, "redundancy": redundancy.ROWS, "lab": lab.ROWS, "exits": exits.ROWS,
          "channels": channels.ROWS, "pages": pages.ROWS, "interpreter": interpreter.ROWS,
          "quantization": quantization.ROWS, "allocation": allocation.ROWS,
          "representations": representations.ROWS, "warm": warm.ROWS, "memory": memory.ROWS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("suites", nargs="*", help=f"any of {', '.join(SUITES)} (default: all)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=common.REPEATS, help="interleaved repetitions per row (>= 3)")
    args = parser.parse_args()
    unknown = [name for name in args.suites if name not in SUITES]
    if unknown:
        parser.error(f"unknown suite {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    if args.repeats < 3:
        parser.error("--repeats must be at least 3")
    torch.set_grad_enabled(False)
    setup = common.Setup(common.gpt2_small(args.layers), common.random_batch(), args.repeats)
    s = setup.handle.structure
    for line in common.machine_lines():
        print(line)
    print(f"model: GPT-2-small shape, random weights ({s.n_layers} layers, d {s.d_model}, vocab {s.d_vocab}); "
          f"batch {common.tokens_text(setup.batch)}")
    print(f"ratio = median over {args.repeats} interleaved repetitions of measured / reference; {common.SPREAD}")
    print(common.header_line(), flush=True)
    for name in args.suites or SUITES:
        for row in SUITES[name]:
            made = row(setup)  # a Row, or several (the memory suite measures every step of a shape)
            for one in made if isinstance(made, list) else [made]:
                print(one.line(), flush=True)


if __name__ == "__main__":
    main()
