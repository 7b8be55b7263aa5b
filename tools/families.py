"""Tiny random-weight checkpoints of every model family LayerScope supports, written
with transformers' own `save_pretrained` and the byte tokenizer, so the test matrix,
the browser walk and the bench load them through the same loader as a user's folder.
The hub is never reached."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from lib.zoo.tokenizer import BYTE_VOCAB_SIZE, save_byte_tokenizer

N_CTX = 64
_COMMON = dict(vocab_size=BYTE_VOCAB_SIZE, bos_token_id=256, eos_token_id=256, pad_token_id=256)


def _gpt2(n_layers: int) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_positions=N_CTX, n_embd=32, n_layer=n_layers, n_head=4, **_COMMON))


def _neox(n_layers: int) -> Any:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=4, intermediate_size=64,
                           max_position_embeddings=N_CTX, rotary_pct=0.25, use_parallel_residual=True, **_COMMON)
    return GPTNeoXForCausalLM(config)


def _llama(n_layers: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=N_CTX, **_COMMON)
    return LlamaForCausalLM(config)


def _qwen2(n_layers: int) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=N_CTX, tie_word_embeddings=True, **_COMMON)
    return Qwen2ForCausalLM(config)


def _mistral(n_layers: int) -> Any:
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=N_CTX, head_dim=8, sliding_window=8,
                           **_COMMON)  # a window shorter than the test windows (24 tokens): the mask matters
    return MistralForCausalLM(config)


def _gemma(n_layers: int) -> Any:
    from transformers import GemmaConfig, GemmaForCausalLM

    config = GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
                         num_key_value_heads=1, head_dim=8, max_position_embeddings=N_CTX, **_COMMON)
    return GemmaForCausalLM(config)


def _phi(n_layers: int) -> Any:
    from transformers import PhiConfig, PhiForCausalLM

    config = PhiConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
                       max_position_embeddings=N_CTX, partial_rotary_factor=0.5, **_COMMON)
    return PhiForCausalLM(config)


def _opt(n_layers: int) -> Any:
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(hidden_size=32, num_hidden_layers=n_layers, ffn_dim=64, num_attention_heads=4,
                       max_position_embeddings=N_CTX, word_embed_proj_dim=32, **_COMMON)
    return OPTForCausalLM(config)


# family -> (builder, what makes it different: the reason it is in the matrix, checkpoints of it)
FAMILIES: dict[str, tuple[Callable[[int], Any], str, str]] = {
    "gpt2": (_gpt2, "LayerNorm, learned positions, Conv1D weights", "`gpt2`, `distilgpt2`"),
    "neox": (_neox, "parallel attention + MLP, partial rotary, fused per-head q/k/v", "`EleutherAI/pythia-160m`"),
    "llama": (_llama, "RMSNorm, gated MLP (SwiGLU), rotary, grouped-query attention", "`meta-llama/Llama-3.2-1B`"),
    "qwen2": (_qwen2, "as Llama, with q/k/v biases and tied embeddings", "`Qwen/Qwen2.5-0.5B`"),
    "mistral": (_mistral, "as Llama, sliding-window attention", "`mistralai/Mistral-7B-v0.1`"),
    "gemma": (_gemma, "GeGLU, RMSNorm (1 + w), scaled embeddings, multi-query attention", "`google/gemma-2b`"),
    "phi": (_phi, "parallel block with one shared LayerNorm, partial rotary", "`microsoft/phi-2`"),
    "opt": (_opt, "learned positions with an offset of 2, ReLU MLP with no module of its own", "`facebook/opt-125m`"),
}

# README column -> the family-matrix tests (tests/test_families*.py) that check it on every family
VIEWS: dict[str, tuple[str, ...]] = {
    "Model, Redundancy": ("test_forward_and_every_block_run_alone_match_plain_transformers",
                          "test_every_single_drop_of_the_fast_sweep_matches_a_plain_hook",
                          "test_redundancy_report_and_sublayer_similarities"),
    "Channels": ("test_head_roles_circuits_and_head_cuts",),
    "Interpreter": ("test_the_linearisation_is_complete_and_its_value_is_the_real_logit",),
    "Lab: prune, drop, export": ("test_structural_edits_equal_plain_hooks_and_export_exactly",
                                 "test_pruning_low_rank_and_sharing_do_what_they_say"),
    "Lab: quantize, exits": ("test_every_quantization_format_llm_int8_and_early_exits",),
}
_GROUPED = "heads go by whole key/value group"
NOTES: dict[tuple[str, str], str] = {
    ("neox", "Model, Redundancy"): "parallel block", ("phi", "Model, Redundancy"): "parallel block",
    ("llama", "Interpreter"): "gate branch frozen", ("qwen2", "Interpreter"): "gate branch frozen",
    ("mistral", "Interpreter"): "gate branch frozen", ("gemma", "Interpreter"): "gate branch frozen",
    ("opt", "Interpreter"): "queries and keys frozen",
    ("llama", "Lab: prune, drop, export"): _GROUPED, ("qwen2", "Lab: prune, drop, export"): _GROUPED,
    ("mistral", "Lab: prune, drop, export"): _GROUPED, ("gemma", "Lab: prune, drop, export"): _GROUPED,
}


def readme_table() -> str:
    """The README's family table: every family of the matrix by every view it is checked on."""
    lines = ["| family | e.g. | what is different | " + " | ".join(VIEWS) + " |",
             "|" + "---|" * (3 + len(VIEWS))]
    for family, (_, different, examples) in FAMILIES.items():
        cells = ["✓" + (f" ({NOTES[family, view]})" if (family, view) in NOTES else "") for view in VIEWS]
        lines.append(f"| {family} | {examples} | {different} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_tiny(family: str, folder: str | Path, n_layers: int = 3, seed: int = 0,
              dtype: torch.dtype = torch.float32) -> Path:
    """Write a random-weight `family` model with `n_layers` blocks and the byte tokenizer to
    `folder`, its weights saved in `dtype` (config.json says which)."""
    build = FAMILIES[family][0]
    torch.manual_seed(seed)
    model = build(n_layers).eval()
    with torch.no_grad():  # some families start their norms at exactly 1 or 0; vary them so freezing them is tested
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name.split(".")[-2:][0]:
                p.add_(0.1 * torch.randn_like(p))
    folder = Path(folder)
    model.to(dtype).save_pretrained(str(folder))
    save_byte_tokenizer(folder, N_CTX)
    return folder


if __name__ == "__main__":
    print(readme_table())
