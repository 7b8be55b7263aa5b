"""What the model predicts for one input: next tokens for a prompt, classes or a
clean image for a digit."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lib.data import DataError
from lib.handle import ModelHandle


@dataclass(frozen=True)
class NextTokens:
    """Top-k next-token predictions after a prompt.

    tokens: the k predicted tokens as text; probs: [k] their probabilities;
    n_prompt_tokens: tokens fed to the model (after truncation, with BOS);
    truncated: how many leading prompt tokens were dropped to fit the context.
    """

    tokens: list[str]
    token_ids: list[int]
    probs: torch.Tensor
    n_prompt_tokens: int
    truncated: int


def next_tokens(handle: ModelHandle, prompt: str, k: int = 10) -> NextTokens:
    """Top-k next tokens after `prompt` (BOS prepended; truncated from the left to fit)."""
    if handle.kind != "causal-lm":
        raise DataError("Next-token prediction needs a language model.")
    if not prompt or not prompt.strip():
        raise DataError("The prompt is empty. Type some text to see what the model predicts next.")
    tok = handle.tokenizer
    ids = tok.encode(prompt, add_special_tokens=False)
    room = handle.structure.n_ctx - (1 if tok.bos_token_id is not None else 0)
    truncated = max(0, len(ids) - room)
    ids = ids[truncated:]
    if tok.bos_token_id is not None:
        ids = [tok.bos_token_id] + ids
    logits = handle.forward(torch.tensor([ids]))[0, -1]  # [vocab]
    probs = torch.softmax(logits.float(), -1)
    top = probs.topk(min(k, probs.numel()))
    top_ids = top.indices.tolist()
    words = [tok.decode([i], clean_up_tokenization_spaces=False) for i in top_ids]
    return NextTokens(words, top_ids, top.values, len(ids), truncated)


@dataclass(frozen=True)
class ImagePrediction:
    """Output for one image [1, H, W]: class probabilities [classes] (classifier) or
    the output image [1, H, W] (image-to-image)."""

    image: torch.Tensor
    probs: torch.Tensor | None
    output_image: torch.Tensor | None


def predict_image(handle: ModelHandle, image: torch.Tensor) -> ImagePrediction:
    """Run one image [1, H, W] through an image model."""
    out = handle.forward(image.unsqueeze(0))[0]
    if handle.kind == "image-classifier":
        return ImagePrediction(image, torch.softmax(out.float(), -1), None)
    return ImagePrediction(image, None, out.clamp(0, 1))
