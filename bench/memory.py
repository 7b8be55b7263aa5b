"""Peak memory of each page's work against the model's weights, and the Redundancy report
against one forward, on real shapes with random weights (issue 25's targets):

    peak memory / weights   (peak resident memory during the step - the process before the
                            model was loaded) / the weights' bytes; the step's own work is
                            within `weights + 1 GiB` when the ratio is <= 1 + 1 GiB / weights
    redundancy report / forward   the Redundancy page's whole report / one forward, at the
                            model's default evaluation batch

Each step runs in a fresh Python process (`python -m bench.memory <shape> <step>`): the
model is loaded there (after every library the steps use, so their code does not count),
the kernel's high-water mark of resident memory (VmHWM) is reset after the load and one
timed forward (`/proc/self/clear_refs`, after handing freed memory back with `malloc_trim`),
so neither's own peak counts, and read after the step. The process gets an address-space
limit (LIMIT_GIB) so that a step which would swallow the machine fails with MemoryError
instead; the row then says so.

Shapes: GPT-2 small (124M, float32) and Llama-3.2-1B (1.24B, bfloat16), their checkpoints
written once to BENCH_DIR. `python -m bench memory` runs GPT-2 small; set
LAYERSCOPE_BENCH_BIG=1 to add the Llama-1B shape (minutes per step on a laptop CPU).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from bench.common import Row, Setup

GIB = 2**30
LIMIT_GIB = 20  # address space per probe process; the machine this runs on must have more free
BENCH_DIR = Path(os.environ.get("LAYERSCOPE_BENCH_DIR", Path(tempfile.gettempdir()) / "layerscope-bench"))
STEPS = ("redundancy", "channels", "lab-every-linear", "lab-drop-blocks")
# what each step's work may add to the weights (issue 25): one copy of the weights for an edit
# that rewrites every linear layer, none otherwise; 1 GiB of working memory on top of either
EXTRA_WEIGHTS = {"redundancy": 0, "channels": 0, "lab-every-linear": 1, "lab-drop-blocks": 0}


def _save_gpt2_small(folder: Path) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(str(folder))


def _save_llama_1b(folder: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         max_position_embeddings=131072, rope_theta=500000.0, torch_dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(folder))


SHAPES: dict[str, tuple[str, Callable[[Path], None]]] = {
    "gpt2-small": ("GPT-2 small (124M, float32)", _save_gpt2_small),
    "llama-1b": ("Llama-3.2-1B shape (1.24B, bfloat16)", _save_llama_1b),
}


def checkpoint(shape: str) -> Path:
    """The shape's random-weight checkpoint folder (written on first use, with the byte tokenizer)."""
    from lib.zoo.tokenizer import save_byte_tokenizer

    folder = BENCH_DIR / shape
    if not (folder / "config.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        SHAPES[shape][1](folder)
        save_byte_tokenizer(folder, 1024)
    return folder


def _resident() -> tuple[int, int]:
    """(resident bytes now, the high-water mark since the last reset) from /proc/self/status."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def _reset_peak() -> None:
    """Give freed memory back (glibc keeps what a freed tensor held resident, so it would count
    as in use) and start the high-water mark again from what is resident now."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def probe(shape: str, step: str) -> dict:
    """Load `shape`, run `step` once and return what it took (run in a fresh process)."""
    import torch
    import transformer_lens  # noqa: F401  (the libraries a step uses are loaded before `before`)
    import transformers  # noqa: F401

    import analysis.channels.report  # noqa: F401
    import analysis.compress.lab  # noqa: F401
    import analysis.redundancy.report  # noqa: F401
    from lib import data
    from lib.models import load_model

    torch.set_grad_enabled(False)
    _reset_peak()
    before, _ = _resident()
    handle = load_model(str(checkpoint(shape)))
    batch = data.default_batch(handle)
    weights = handle.size_bits // 8
    inputs = batch.tokens
    start = time.perf_counter()
    handle.forward(inputs)
    forward_s = time.perf_counter() - start
    _reset_peak()
    start = time.perf_counter()
    try:
        _run(step, handle, batch)
        error = ""
    except MemoryError as e:
        error = f"out of memory ({e})"
    seconds = time.perf_counter() - start
    _, peak = _resident()
    result = {"peak": peak - before, "weights": weights, "seconds": seconds, "forward_s": forward_s,
              "batch": "x".join(map(str, inputs.shape)), "error": error}
    if step == "redundancy":  # once per shape, after the peak was read: the load-time check
        from lib.verify import verify

        v = verify(handle, inputs)
        result["verify"] = {"diff": v.max_abs_diff, "scale": v.scale, "tolerance": v.tolerance}
    return result


def _run(step: str, handle, batch) -> None:
    if step == "redundancy":
        from analysis.redundancy.report import build_report

        build_report(handle, batch)
    elif step == "channels":
        from analysis.channels.circuits import circuits, composition_scores
        from analysis.channels.heads import head_roles, role_probe

        composition_scores(circuits(handle))
        head_roles(handle, role_probe(handle))
    elif step in ("lab-every-linear", "lab-drop-blocks"):
        from analysis.compress.lab import Lab
        from analysis.compress.prune.pruning import Drop
        from analysis.compress.quant.quantize import Quantize

        lab = Lab(handle, batch)  # as the page makes it: latency timed against the base
        edits = [Quantize("int8")] if step == "lab-every-linear" else [Drop("block", 1), Drop("block", 2)]
        for edit in edits:
            lab.add(edit)
    else:
        raise SystemExit(f"unknown step {step!r}; the steps are {', '.join(STEPS)}")


def measured(shape: str, step: str) -> dict:
    """`probe(shape, step)` in a fresh process under the address-space limit."""
    checkpoint(shape)  # written here, so the probe's peak is its own
    code = f"import json; from bench.memory import probe; print(json.dumps(probe({shape!r}, {step!r})))"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (LIMIT_GIB * GIB, LIMIT_GIB * GIB))

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=limit,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"the probe failed: {tail[:160]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_rows(shape: str) -> list[Row]:
    label = SHAPES[shape][0]
    rows = []
    for step in STEPS:
        m = measured(shape, step)
        if "peak" not in m:
            rows.append(Row(f"peak memory / weights: {step}", (float("nan"),), f"{label}: {m['error']}"))
            continue
        target = 1 + EXTRA_WEIGHTS[step] + GIB / m["weights"]
        verdict = "met" if m["peak"] / m["weights"] <= target else "missed"
        rows.append(Row(f"peak memory / weights: {step}", (m["peak"] / m["weights"],),
                        f"{label}, batch {m['batch']}: peak {m['peak'] / GIB:.2f} GiB over the process before the "
                        f"model, weights {m['weights'] / GIB:.2f} GiB; target <= {target:.2f} ({verdict}); "
                        f"{m['seconds']:.0f} s{'; ' + m['error'] if m['error'] else ''}"))
        if step == "redundancy" and not m["error"]:
            rows.append(Row("redundancy report / forward", (m["seconds"] / m["forward_s"],),
                            f"{label}, batch {m['batch']}: {m['seconds']:.1f} s vs {m['forward_s']:.2f} s"))
        if "verify" in m:  # a false "outputs differ" at load would put every page in doubt
            v = m["verify"]
            rows.append(Row("load check: |hooked - plain| / rounding tolerance", (v["diff"] / v["tolerance"],),
                            f"{label}: {v['diff']:.3g} of outputs up to {v['scale']:.3g}, tolerance "
                            f"{v['tolerance']:.3g} (target < 1: verified)"))
    return rows


def gpt2_rows(setup: Setup) -> list[Row]:
    return memory_rows("gpt2-small")


def llama_rows(setup: Setup) -> list[Row]:
    if os.environ.get("LAYERSCOPE_BENCH_BIG") != "1":
        return [Row("peak memory / weights: Llama-1B shape", (float("nan"),),
                    "skipped: set LAYERSCOPE_BENCH_BIG=1 (minutes per step, about 8 GiB free memory)")]
    return memory_rows("llama-1b")


ROWS = (gpt2_rows, llama_rows)


if __name__ == "__main__":
    for row in memory_rows(sys.argv[1]) if len(sys.argv) == 2 else []:
        print(row.line(), flush=True)
    if len(sys.argv) == 3:
        print(json.dumps(probe(sys.argv[1], sys.argv[2])))
