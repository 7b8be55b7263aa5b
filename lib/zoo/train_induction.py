"""Train `zoo:induction-2l`: a 2-layer attention-only GPT-2 that learns induction.

Half of each batch is BOS, a block of n distinct random tokens (n varies, so no
fixed positional offset solves the task), the same block again, then random
filler; the other half are in-context Markov chains. Without the Markov half the
model copies through a positional shortcut (a duplicate-token head that passes on
where the earlier occurrence sits); with it, it grows the textbook circuit: a
previous-token head (layer 0) feeding an induction head (layer 1). The model is a
Hugging Face GPT-2 whose MLPs are one unit wide and fixed at zero weights, so it
loads like any checkpoint and is attention-only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lib import data
from lib.zoo.tokenizer import BOS_TOKEN, bos_post_processor

VOCAB, BOS_ID, SEQ_LEN = 64, 64, 64
MIN_HALF, MAX_HALF = 6, 30
CONFIG = dict(
    vocab_size=VOCAB + 1, n_positions=SEQ_LEN, n_embd=64, n_layer=2, n_head=4, n_inner=1,
    activation_function="relu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    bos_token_id=BOS_ID, eos_token_id=BOS_ID, pad_token_id=BOS_ID,
)
BATCH, STEPS, LR = 64, 8000, 1e-3

# The model card's plain-transformers example (run, with its output, by `lib.zoo.train.write_card`).
USAGE = """
from transformers import AutoModelForCausalLM, AutoTokenizer

folder = "lib/zoo/induction-2l"
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder).eval()

# A block of distinct tokens, then the start of its repeat; BOS (id 64) goes first.
block = "t5 t17 t42 t8 t33 t21 t60 t2"
prompt = tokenizer(f"{block} t5 t17", return_tensors="pt")
out = model.generate(**prompt, max_new_tokens=6, do_sample=False)
print(tokenizer.decode(out[0, prompt["input_ids"].shape[1]:]))  # the rest of the block, copied
"""


def repeated_sequences(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return data.repeated_token_sequences(n, VOCAB, BOS_ID, SEQ_LEN, gen, MIN_HALF, MAX_HALF)


def markov_sequences(n: int, gen: torch.Generator, states: int = 10, alpha: float = 0.3) -> torch.Tensor:
    """In-context Markov chains (Edelman et al. 2024): each row draws its own states
    and transition matrix, so the next token is predictable only from bigrams seen
    earlier in the same row. Learning this grows the canonical circuit: a
    previous-token head in layer 0 feeding a statistical induction head in layer 1.
    Returns tokens [n, SEQ_LEN] with BOS first."""
    vocab = torch.argsort(torch.rand(n, VOCAB, generator=gen), dim=1)[:, :states]  # [n, states]
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))  # Dirichlet has no generator
    transition = torch.distributions.Dirichlet(torch.full((states,), alpha)).sample((n, states))
    tokens = torch.full((n, SEQ_LEN), BOS_ID)
    state = torch.randint(0, states, (n,), generator=gen)
    rows = torch.arange(n)
    for t in range(1, SEQ_LEN):
        tokens[:, t] = vocab[rows, state]
        state = torch.multinomial(transition[rows, state], 1, generator=gen).squeeze(1)
    return tokens


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


def build_tokenizer():
    """A word-level tokenizer: tokens are written `t0 .. t63`, BOS is `<|endoftext|>`,
    which it puts first (as every training sequence had it) unless called with
    `add_special_tokens=False`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)} | {BOS_TOKEN: BOS_ID}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=BOS_TOKEN))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    core.post_processor = bos_post_processor(BOS_TOKEN, BOS_ID)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS_TOKEN, eos_token=BOS_TOKEN,
                                   unk_token=BOS_TOKEN, pad_token=BOS_TOKEN, model_max_length=SEQ_LEN)


def save_tokenizer(folder) -> None:
    build_tokenizer().save_pretrained(str(folder))


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
        tokens, _ = repeated_sequences(BATCH // 2, gen)
        tokens = torch.cat([tokens, markov_sequences(BATCH // 2, gen)])
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
        "repeat_accuracy": acc, "steps": steps, "params": n_params, **head_scores(out), "usage": USAGE,
        "architecture": (f"GPT-2 (Hugging Face `GPT2LMHeadModel`), attention-only: 2 layers, "
                         f"4 heads, d_model 64, context {SEQ_LEN}, vocabulary {VOCAB} + BOS; the MLPs are "
                         f"one unit wide with all weights fixed at zero; {n_params:,} parameters."),
    }


def head_scores(folder, n_sequences: int = 8, seed: int = 3) -> dict:
    """Best previous-token score in layer 0 and best induction score in layer 1:
    TransformerLens `detect_head` ("mul"), averaged over sequences of three copies of a
    block of 15 distinct tokens. Three copies, because the score divides by all the
    attention of all query rows: with two copies only the second half's rows have an
    induction target, so even a perfect induction head scores about 0.49."""
    from transformer_lens.head_detector import detect_head

    from lib.models import load_model

    handle = load_model(str(folder))
    gen = torch.Generator().manual_seed(seed)
    seqs = []
    for _ in range(n_sequences):
        block = " ".join(f"t{i}" for i in torch.randperm(VOCAB, generator=gen)[:15].tolist())
        seqs.append(" ".join([block] * 3))
    with torch.no_grad():
        prev = detect_head(handle.model, seqs, "previous_token_head")
        induction = detect_head(handle.model, seqs, "induction_head")
    return {
        "layer0_previous_token_score": float(prev[0].max()),
        "layer0_previous_token_head": int(prev[0].argmax()),
        "layer1_induction_score": float(induction[1].max()),
        "layer1_induction_head": int(induction[1].argmax()),
    }
