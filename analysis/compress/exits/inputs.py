"""Where the predictions for one input exit (METHODS.md §6): a prompt's tokens or a few
images, each with the depth it leaves at under an early-exit rule and what it predicts
there next to the full model's prediction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from analysis.compress.exits.readouts import exit_depths, exit_lens
from analysis.compress.exits.rule import EarlyExit, ExitRule
from lib.data import MAX_PROMPT_CHARS, check_images, check_text
from lib.errors import DataError
from lib.handle import ModelHandle, check_handle


@dataclass(frozen=True)
class InputExits:
    """Where each prediction for one input exits.

    labels: what each row is (the prompt's tokens as text, BOS first; or "image i");
    exit_depth: its exit depth (n_layers: it ran the whole model); where: the exit in
    words ("after block 2", "after conv2", "full model"); predicted / full: the prediction
    there and the full model's; agrees: whether they match; depths: the checked depths;
    rule: the early exit in words.
    """

    labels: list[str]
    exit_depth: list[int]
    where: list[str]
    predicted: list[str]
    full: list[str]
    agrees: list[bool]
    n_layers: int
    depths: tuple[int, ...]
    rule: str


def depth_label(handle: ModelHandle, depth: int) -> str:
    """A depth in words: "after block 2" (LM), "after conv2" (stages), "full model"."""
    n_layers = handle.structure.n_layers
    if depth >= n_layers:
        return "full model"
    if handle.kind == "causal-lm":
        return f"after block {depth - 1}" if depth else "embeddings"
    return f"after {handle.structure.stages[depth - 1][0]}" if depth else "input"


def _exits_for(handle: ModelHandle, inputs: torch.Tensor, edit: EarlyExit, labels: list[str],
               name: Callable[[int], str]) -> InputExits:
    edit.check_exits(handle)
    rule = ExitRule(edit.criterion, edit.threshold, exit_lens(handle, edit.lens), exit_depths(handle))
    states, output = handle.exit_states(inputs)
    index = rule.exit_index(handle, states, output)
    exited = rule.outputs(handle, states, output, index).reshape(index.shape[0], -1).argmax(-1)
    full = output.reshape(index.shape[0], -1).argmax(-1)
    depth = [(rule.depths + (len(states),))[i] for i in index.tolist()]
    return InputExits(labels, depth, [depth_label(handle, d) for d in depth], [name(i) for i in exited.tolist()],
                      [name(i) for i in full.tolist()], (exited == full).tolist(), len(states), rule.depths,
                      edit.label)


def prompt_exits(handle: ModelHandle, prompt: str, criterion: str, threshold: float, lens: str = "logit"
                 ) -> InputExits:
    """Per token of `prompt` (BOS prepended, cut from the left to the context): the depth
    where the prediction of the next token exits under this criterion and threshold, and
    what it predicts there. A tuned lens is trained first if needed (`exit_lens`)."""
    check_handle(handle)
    if handle.kind != "causal-lm":
        raise DataError(f"A prompt needs a language model; this is an {handle.kind} model: use image_exits.")
    check_text(prompt, "prompt", MAX_PROMPT_CHARS)
    tok = handle.tokenizer
    ids = tok.encode(prompt, add_special_tokens=False)
    if not prompt.strip() or not ids:
        raise DataError("The prompt is empty. Type some text to see where each token exits.")
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    ids = bos + ids[max(0, len(ids) + len(bos) - handle.structure.n_ctx):]
    decode = lambda i: tok.decode([i], clean_up_tokenization_spaces=False)  # noqa: E731
    labels = ["BOS"] * len(bos) + [decode(i) for i in ids[len(bos):]]  # "<|endoftext|>" would not fit a cell
    return _exits_for(handle, torch.tensor([ids]), EarlyExit(criterion, threshold, lens), labels, decode)


def image_exits(handle: ModelHandle, images: torch.Tensor, criterion: str, threshold: float, lens: str = "heads"
                ) -> InputExits:
    """Per image [n, 1, 8, 8]: the stage where a classifier's prediction exits and the
    class it predicts there."""
    if handle.kind != "image-classifier":
        raise DataError(f"Image exits need a classifier; this is a {handle.kind} model.")
    check_images(images)
    return _exits_for(handle, images, EarlyExit(criterion, threshold, lens),
                      [f"image {i}" for i in range(images.shape[0])], str)
