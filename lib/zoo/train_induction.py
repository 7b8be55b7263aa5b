"""Train `zoo:induction-2l`: a 2-layer attention-only GPT-2 that learns induction.

Each sequence is BOS, a random block of n tokens (n varies, so no fixed positional
offset solves the task), the same block again, then random filler. Predicting the
repeated half needs a previous-token head (layer 0) feeding an induction head
(layer 1). The model is a Hugging Face GPT-2 whose MLPs are one unit wide and
fixed at zero weights, so it loads like any checkpoint and is attention-only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lib import data

VOCAB, BOS_ID, SEQ_LEN = 64, 64, 64
MIN_HALF, MAX_HALF = 6, 30
CONFIG = dict(
    vocab_size=VOCAB + 1, n_positions=SEQ_LEN, n_embd=64, n_layer=2, n_head=4, n_inner=1,
    activation_function="relu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    bos_token_id=BOS_ID, eos_token_id=BOS_ID, pad_token_id=BOS_ID,
)
BATCH, STEPS, LR = 64, 4000, 1e-3


def repeated_sequences(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return data.repeated_token_sequences(n, VOCAB, BOS_ID, SEQ_LEN, gen, MIN_HALF, MAX_HALF)


def build_model(seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**CONFIG))
    for block in model.transformer.h:  # attention-only: the MLP is exactly zero
        for p in block.mlp.parameters():
            p.data.zero_()
            p.requires_grad_(False)
    return model


@torch.no_grad()
def repeat_accuracy(model, n: int = 512, seed: int = 99) -> float:
    """Top-1 accuracy on the repeated half of fresh sequences."""
    tokens, mask = repeated_sequences(n, torch.Generator().manual_seed(seed))
    logits = model(tokens).logits[:, :-1]
    hit = logits.argmax(-1) == tokens[:, 1:]
    return hit[mask[:, 1:]].float().mean().item()


def save_tokenizer(folder) -> None:
    """A word-level tokenizer: tokens are written `t0 .. t63`, BOS is `<|endoftext|>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)} | {"<|endoftext|>": BOS_ID}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", model_max_length=SEQ_LEN)
    tok.save_pretrained(str(folder))


def train(out, seed: int, steps: int | None) -> dict:
    from tqdm import trange

    steps = steps or STEPS
    model = build_model(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    bar = trange(steps, unit="step")
    for step in bar:
        tokens, _ = repeated_sequences(BATCH, gen)
        logits = model(tokens).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    acc = repeat_accuracy(model)
    out.mkdir(parents=True, exist_ok=True)
    model.config.layerscope_eval = "repeated-tokens"  # tells lib.data which batch fits
    model.save_pretrained(str(out), safe_serialization=True)
    save_tokenizer(out)
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "repeat_accuracy": acc, "steps": steps, "params": n_params,
        "architecture": (f"GPT-2 (Hugging Face `GPT2LMHeadModel`), attention-only: 2 layers, "
                         f"4 heads, d_model 64, context {SEQ_LEN}, vocabulary {VOCAB} + BOS; the MLPs are "
                         f"one unit wide with all weights fixed at zero; {n_params:,} parameters."),
    }
