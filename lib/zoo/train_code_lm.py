"""Train `zoo:code-lm`: a byte-level GPT-2 on the Python standard library.

The training text is every stdlib file except the held-out ones of `lib.corpus`
(every 50th file); quality is bits per byte on the held-out files at the training
context. The run is deterministic for a given `--steps`: with only a time budget,
the step count is fixed once from the measured speed of the first steps and
stored in the checkpoint, so a resumed run follows the same schedule.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lib import corpus, data
from lib.zoo.tokenizer import BOS_ID, BYTE_VOCAB_SIZE, save_byte_tokenizer

CONFIG = dict(
    vocab_size=BYTE_VOCAB_SIZE, n_positions=256, n_embd=160, n_layer=6, n_head=4,
    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    bos_token_id=BOS_ID, eos_token_id=BOS_ID, pad_token_id=BOS_ID,
)
BATCH = 24
LR, LR_MIN, WARMUP = 2e-3, 2e-4, 100

# The model card's plain-transformers example (run, with its output, by `lib.zoo.train.write_card`).
USAGE = r"""
import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

folder = "lib/zoo/code-lm"
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder).eval()

# BOS (id 256) first, then one token per UTF-8 byte. For longer text, tokenize pieces of
# at most 255 bytes: each window then starts with BOS, as in training and on this card.
text = "def mean(values):\n    return sum(values) / len(values)\n"
inputs = tokenizer(text, return_tensors="pt")
with torch.no_grad():
    loss = model(**inputs, labels=inputs["input_ids"]).loss  # mean NLL of the predicted bytes, nats
print(f"{loss.item() / math.log(2):.2f} bits per byte")

prompt = tokenizer("import os\n\n\ndef ", return_tensors="pt")
out = model.generate(**prompt, max_new_tokens=40, do_sample=False)
print(tokenizer.decode(out[0], skip_special_tokens=True))
"""


def build_model(seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**CONFIG))


def training_stream() -> np.ndarray:
    """All training files as one uint8 array (file boundaries are newlines)."""
    return np.frombuffer(b"\n".join(corpus.read_bytes(corpus.training_files())), dtype=np.uint8)


def heldout_windows(seq_len: int) -> tuple[torch.Tensor, int]:
    """Every non-overlapping window of the held-out text: [n, seq_len] with BOS
    first, and the number of predicted bytes."""
    text = b"\n".join(corpus.read_bytes(corpus.heldout_files()))
    ids = list(text.decode("utf-8", errors="replace").encode("utf-8"))
    rows = data.windows_from_ids(ids, seq_len, BOS_ID)
    return rows, int(rows.shape[0] * (seq_len - 1))


@torch.no_grad()
def bits_per_byte(model, rows: torch.Tensor, batch: int = 64) -> float:
    """Mean next-byte NLL in bits over rows [n, pos] (the BOS column is not predicted)."""
    model.eval()
    nll, count = 0.0, 0
    for i in range(0, len(rows), batch):
        x = rows[i:i + batch]
        logits = model(x).logits[:, :-1]
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                               reduction="sum").item()
        count += x[:, 1:].numel()
    model.train()
    return nll / count / math.log(2)


def lr_at(step: int, total: int) -> float:
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    frac = min(1.0, (step - WARMUP) / max(1, total - WARMUP))
    return LR_MIN + 0.5 * (LR - LR_MIN) * (1 + math.cos(math.pi * frac))


def train(out: Path, minutes: float, seed: int, steps: int | None, run_dir: Path) -> dict:
    from tqdm import tqdm

    seq_len = CONFIG["n_positions"]
    stream = torch.from_numpy(training_stream().astype(np.int64))
    eval_rows, n_eval_bytes = heldout_windows(seq_len)
    quick_rows = eval_rows[:: max(1, len(eval_rows) // 192)]

    model = build_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    ckpt_path = run_dir / "code-lm.ckpt"
    state = {"step": 0, "total": steps, "elapsed": 0.0}
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        gen.set_state(ckpt["gen"])
        state = ckpt["state"]
        if steps is not None:  # an explicit step count re-fixes the schedule's length
            state["total"] = steps
        print(f"resumed at step {state['step']} of {state['total']}")

    body = seq_len - 1
    start = time.time() - state["elapsed"]
    last_save = time.time()
    bar = tqdm(total=state["total"] or 0, initial=state["step"], unit="step")
    model.train()
    while state["total"] is None or state["step"] < state["total"]:
        step = state["step"]
        offsets = torch.randint(0, len(stream) - body, (BATCH,), generator=gen)
        x = torch.stack([stream[o:o + body] for o in offsets.tolist()])
        x = torch.cat([torch.full((BATCH, 1), BOS_ID, dtype=torch.long), x], 1)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, state["total"] or 10**9)
        logits = model(x).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        state["step"] += 1
        state["elapsed"] = time.time() - start
        if state["total"] is None and state["step"] == 30:
            # Fix the schedule from the measured speed: deterministic from here on.
            per_step = state["elapsed"] / 30
            state["total"] = max(200, int(minutes * 60 / per_step))
            bar.reset(total=state["total"])
            bar.update(state["step"])
            print(f"\n{per_step:.3f} s/step -> {state['total']} steps in {minutes} min")
        bar.update(1)
        bar.set_postfix(loss_bits=f"{loss.item() / math.log(2):.3f}")
        if state["step"] % 500 == 0:
            print(f"\nstep {state['step']}: held-out subset {bits_per_byte(model, quick_rows):.3f} bits/byte",
                  flush=True)
        if time.time() - last_save > 300:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                        "gen": gen.get_state(), "state": state}, ckpt_path)
            last_save = time.time()
    bar.close()

    bpb = bits_per_byte(model, eval_rows)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    save_byte_tokenizer(out, seq_len)
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "bits_per_byte": bpb, "heldout_bytes": n_eval_bytes, "steps": state["total"],
        "wall_minutes": state["elapsed"] / 60, "params": n_params,
        "tokens_seen": state["total"] * BATCH * seq_len, "usage": USAGE,
        "architecture": (f"GPT-2 (Hugging Face `GPT2LMHeadModel`): {CONFIG['n_layer']} layers, "
                         f"{CONFIG['n_head']} heads, d_model {CONFIG['n_embd']}, context {seq_len}, "
                         f"byte vocabulary of {BYTE_VOCAB_SIZE} (256 bytes + BOS), tied embeddings; "
                         f"{n_params:,} parameters."),
    }
