"""What the model predicts for one input: next tokens for a prompt, classes or a
clean image for a digit."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lib.data import DIGIT_SHAPE, MAX_PROMPT_CHARS, DataError, check_images, check_text
from lib.handle import ModelHandle


@dataclass(frozen=True)
class NextTokens:
    """Top-k next-token predictions after a prompt.

    tokens: the k predicted tokens as text; probs: [k] their probabilities;
    n_prompt_tokens: tokens fed to the model (after truncation, with BOS);
    truncated: how many leading prompt tokens were dropped to fit the context;
    unknown: the pieces of the fed prompt that the model's vocabulary cannot
    represent, in prompt order (each became the tokenizer's unknown or another
    special token, e.g. "hello" on a word-level vocabulary of `t0`..`t63`); empty
    when every piece has a token of its own (always, for a byte tokenizer).
    """

    tokens: list[str]
    token_ids: list[int]
    probs: torch.Tensor
    n_prompt_tokens: int
    truncated: int
    unknown: list[str] = field(default_factory=list)


def _encode(tok: Any, prompt: str) -> tuple[list[int], list[str | None]]:
    """Token ids of `prompt` and, per id, the prompt piece it stands for when that
    piece has no token of its own (else None).

    A piece is unrepresented when it encoded to the unknown token or to another special
    token whose text it is not (a word-level tokenizer maps unknown words to its
    unk/BOS token); typing a special token's own text (e.g. "<|endoftext|>") is not.
    """
    special = set(tok.all_special_ids)
    if getattr(tok, "unk_token_id", None) is not None:
        special.add(tok.unk_token_id)
    if getattr(tok, "is_fast", False):
        enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
        ids, spans = list(enc["input_ids"]), [prompt[a:b] for a, b in enc["offset_mapping"]]
    else:  # no offsets: attribute each whitespace-separated word's ids to the word
        ids, spans = [], []
        for word in prompt.split():
            word_ids = tok.encode(word, add_special_tokens=False)
            ids += word_ids
            spans += [word] * len(word_ids)
    unknown = [span if i in special and span.strip() != tok.convert_ids_to_tokens(i) else None
               for i, span in zip(ids, spans)]
    return ids, unknown


def next_tokens(handle: ModelHandle, prompt: str, k: int = 10) -> NextTokens:
    """Top-k next tokens after `prompt` (BOS prepended; truncated from the left to fit).
    Prompt pieces the vocabulary cannot represent are listed in `NextTokens.unknown`."""
    if handle.kind != "causal-lm":
        raise DataError(f"Next-token prediction needs a language model; this is an image model ({handle.kind}). "
                        "Use predict_image for an image.")
    check_text(prompt, "prompt", MAX_PROMPT_CHARS)
    if not prompt.strip():
        raise DataError("The prompt is empty. Type some text to see what the model predicts next.")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise DataError(f"The number of next tokens to show must be a whole number of at least 1; got {k!r}.")
    tok = handle.tokenizer
    ids, unknown = _encode(tok, prompt)
    if not ids:
        raise DataError("The tokenizer turned the prompt into no tokens at all; try other text.")
    room = handle.structure.n_ctx - (1 if tok.bos_token_id is not None else 0)
    truncated = max(0, len(ids) - room)
    ids, unknown = ids[truncated:], unknown[truncated:]
    if tok.bos_token_id is not None:
        ids = [tok.bos_token_id] + ids
    logits = handle.forward(torch.tensor([ids]))[0, -1]  # [vocab]
    probs = torch.softmax(logits.float(), -1)
    top = probs.topk(min(k, probs.numel()))
    top_ids = top.indices.tolist()
    words = [tok.decode([i], clean_up_tokenization_spaces=False) for i in top_ids]
    return NextTokens(words, top_ids, top.values, len(ids), truncated, [u for u in unknown if u is not None])


@dataclass(frozen=True)
class ImagePrediction:
    """Output for one image [1, H, W]: class probabilities [classes] (classifier) or
    the output image [1, H, W] (image-to-image)."""

    image: torch.Tensor
    probs: torch.Tensor | None
    output_image: torch.Tensor | None


def predict_image(handle: ModelHandle, image: torch.Tensor) -> ImagePrediction:
    """Run one image [1, 8, 8] (float, finite) through an image model."""
    if handle.kind == "causal-lm":
        raise DataError("This is a language model: it predicts next tokens for a prompt, not images.")
    if not isinstance(image, torch.Tensor) or not image.is_floating_point() or image.dim() != len(DIGIT_SHAPE):
        what = f"shape {list(image.shape)}, {image.dtype}" if isinstance(image, torch.Tensor) else type(image).__name__
        raise DataError(f"One image must be a float tensor {list(DIGIT_SHAPE)}; got {what}.")
    check_images(image.unsqueeze(0))
    out = handle.forward(image.unsqueeze(0))[0]
    if handle.kind == "image-classifier":
        return ImagePrediction(image, torch.softmax(out.float(), -1), None)
    return ImagePrediction(image, None, out.clamp(0, 1))
