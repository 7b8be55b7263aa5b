"""Evaluation sets: held-out Python source, user text, and scikit-learn digits (read by
`lib.corpus`), and the checks that a batch fits a model.

Everything here is deterministic: the same interpreter gives the same file list,
the same held-out split and the same batches, so metrics are comparable across
sessions and the bundled code LM is never evaluated on text it was trained on.
"""

from __future__ import annotations

import hashlib
import numbers
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence

import numpy as np
import torch

from lib.corpus import DIGITS_NOISE_STD, add_digit_noise, digits_split, heldout_files, read_bytes
from lib.errors import CapabilityError, DataError  # DataError re-exported: callers catch lib.data.DataError
from lib.handle import check_handle

EVAL_PARAMETER_TOKENS = 124_000_000 * 16 * 256  # parameters x tokens: GPT-2 small keeps 16 x 256, 1.2B gets 2 x 256
DIGIT_SHAPE = (1, 8, 8)  # every image model here reads one 8x8 grey digit: [1, 8, 8]


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # numpy ints too


def _tensor_digest(digest: Any, tensor: torch.Tensor | None) -> None:
    """Feed shape, dtype and bytes of `tensor` (or a marker for None) to a hashlib digest."""
    if tensor is None:
        digest.update(b"none|")
        return
    t = tensor.detach().cpu().contiguous()
    digest.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


@dataclass(frozen=True)
class TextBatch:
    """A fixed batch of token windows for a causal LM.

    tokens: [batch, pos] int64, each row starts with BOS when `has_bos`; at least one
        row and two columns (one token to read, one to predict).
    n_bytes: UTF-8 bytes of the predicted text (positions 1..pos-1 of every row),
        the denominator of bits per byte; 0 for synthetic token tasks (then no bits
        per byte is reported).
    answer_mask: [batch, pos] bool, True where a token is a task answer (top-1
        accuracy is measured there), or None for plain text.

    The fields are checked on construction, so a malformed batch cannot be built;
    whether it fits a given model is `check_batch`'s job.
    """

    tokens: torch.Tensor
    n_bytes: int
    has_bos: bool
    source: str
    answer_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        t = self.tokens
        if not isinstance(t, torch.Tensor):
            raise DataError(f"Token ids must be a torch tensor [batch, pos], got {type(t).__name__}.")
        if t.dtype != torch.long:
            hint = "integers, not floats" if t.is_floating_point() else "int64 (torch.long)"
            raise DataError(f"Token ids must be {hint}; got dtype {t.dtype}. Convert whole-number ids with "
                            "tokens.long(), or build the batch with lib.data.")
        if t.dim() != 2:
            raise DataError(f"Token ids must be 2-D [batch, pos]; got shape {tuple(t.shape)}. "
                            "Use tokens.unsqueeze(0) for a single window.")
        if t.shape[0] == 0:
            raise DataError("The batch is empty (0 windows): there is nothing to evaluate.")
        if t.shape[1] < 2:
            raise DataError(f"Windows of {t.shape[1]} token(s) are too short: a window needs at least 2 "
                            "tokens, one to read and one to predict.")
        if not _is_int(self.n_bytes) or self.n_bytes < 0:
            raise DataError(f"n_bytes must be a whole number ≥ 0 (the UTF-8 bytes of the predicted text, "
                            f"0 for synthetic tokens); got {self.n_bytes!r}.")
        if self.answer_mask is not None:
            self._check_mask(self.answer_mask)

    def _check_mask(self, mask: torch.Tensor) -> None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise DataError("answer_mask must be a bool tensor [batch, pos] (True where a token is an answer).")
        if mask.shape != self.tokens.shape:
            raise DataError(f"answer_mask has shape {tuple(mask.shape)} but the tokens have "
                            f"{tuple(self.tokens.shape)}; they must be equal.")
        if not mask[:, 1:].any():
            raise DataError("answer_mask marks no predicted position (column 1 on), so accuracy "
                            "would be undefined. Mark at least one answer, or pass None for plain text.")

    @property
    def n_predicted(self) -> int:
        return int(self.tokens.shape[0] * (self.tokens.shape[1] - 1))

    @cached_property
    def digest(self) -> str:
        """Identity of the batch's content: 16 hex digits of SHA-256 over the tokens,
        n_bytes, has_bos and answer mask (not `source`, a description). Equal digests
        mean the same evaluation; computed once (do not change the tensors in place)."""
        d = hashlib.sha256(b"text|")
        _tensor_digest(d, self.tokens)
        d.update(f"|{self.n_bytes}|{self.has_bos}|".encode())
        _tensor_digest(d, self.answer_mask)
        return d.hexdigest()[:16]


@dataclass(frozen=True)
class ImageBatch:
    """Images with labels (classifier) or clean targets (image-to-image).

    images: [batch, 1, 8, 8] float32 in [0, 1], at least one; labels: [batch] int64;
    targets: [batch, 1, 8, 8] clean images for a denoiser, else None.
    The fields are checked on construction (see `TextBatch`).
    """

    images: torch.Tensor
    labels: torch.Tensor
    targets: torch.Tensor | None
    source: str

    def __post_init__(self) -> None:
        x, y = self.images, self.labels
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            what = f"shape {tuple(x.shape)}, {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise DataError(f"Images must be a float tensor [batch, 1, 8, 8]; got {what}. "
                            "(One image [1, 8, 8] becomes a batch with image.unsqueeze(0).)")
        if x.shape[0] == 0:
            raise DataError("The batch is empty (0 images): there is nothing to evaluate.")
        if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.is_floating_point() or y.dtype == torch.bool:
            raise DataError("Labels must be an integer tensor [batch], one class per image.")
        if y.shape[0] != x.shape[0]:
            raise DataError(f"There are {x.shape[0]} images but {y.shape[0]} label(s); give one label per image.")
        t = self.targets
        if t is not None and (not isinstance(t, torch.Tensor) or t.shape != x.shape or not t.is_floating_point()):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise DataError(f"Target images must be a float tensor of the images' shape {tuple(x.shape)}; "
                            f"got {shape}.")

    @property
    def n_predicted(self) -> int:
        return int(self.images.shape[0])

    @cached_property
    def digest(self) -> str:
        """Identity of the batch's content: 16 hex digits of SHA-256 over images,
        labels and targets (not `source`); see `TextBatch.digest`."""
        d = hashlib.sha256(b"image|")
        for t in (self.images, self.labels, self.targets):
            _tensor_digest(d, t)
        return d.hexdigest()[:16]


Batch = TextBatch | ImageBatch


# --------------------------------------------------------------------------- text


def check_window_args(seq_len: object, n_windows: object, name: str = "n_windows") -> None:
    """Refuse a window length below 2 tokens (one read, one predicted) and a window
    count (`name`) below 1; `n_windows` None means "as many as fit"."""
    if not _is_int(seq_len) or seq_len < 2:
        raise DataError(f"The window length must be a whole number of at least 2 tokens (one to read, one "
                        f"to predict); got seq_len={seq_len!r}.")
    if n_windows is not None and (not _is_int(n_windows) or n_windows < 1):
        raise DataError(f"{name} must be a whole number of at least 1; got {n_windows!r}.")


def check_tokenizer(tokenizer: object) -> None:
    if not callable(getattr(tokenizer, "encode", None)):
        raise DataError(f"Expected the model's tokenizer (handle.tokenizer), not a {type(tokenizer).__name__} value.")


MAX_TEXT_CHARS, MAX_PROMPT_CHARS = 4_000_000, 20_000  # an evaluation text; a prompt (tokenized whole, then cut)


def check_text(text: object, what: str = "text", limit: int = MAX_TEXT_CHARS) -> str:
    """Return `text` if it is a str of at most `limit` characters that encodes as UTF-8; else a
    DataError. A lone surrogate (e.g. "\\ud800") is no Unicode character: no tokenizer encodes it."""
    if not isinstance(text, str):
        raise DataError(f"The {what} must be a string; got {type(text).__name__}.")
    if len(text) > limit:
        raise DataError(f"The {what} has {len(text):,} characters; at most {limit:,} are read. Shorten it.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"The {what} contains an invalid character (lone surrogate U+{ord(text[e.start]):04X} at "
                        f"character {e.start}), which is not valid Unicode. Remove it, or decode the source with "
                        "errors='replace'.") from None
    return text


def windows_from_ids(
    ids: Sequence[int], seq_len: int, bos_id: int | None, max_windows: int | None = None
) -> torch.Tensor:
    """Cut one long id sequence into non-overlapping rows of `seq_len` tokens,
    each starting with BOS when `bos_id` is given. Returns [n, seq_len] int64."""
    check_window_args(seq_len, max_windows, "max_windows")
    body = seq_len - (1 if bos_id is not None else 0)
    n = len(ids) // body
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise DataError(
            f"The text is too short: it has {len(ids)} tokens, but one evaluation window "
            f"needs {body}. Use a longer text or a shorter window."
        )
    rows = torch.tensor(list(ids[: n * body]), dtype=torch.long).view(n, body)
    if bos_id is not None:
        rows = torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), rows], dim=1)
    return rows


def _count_bytes(tokenizer, rows: torch.Tensor) -> int:
    """UTF-8 bytes of the predicted tokens: every column but the first."""
    text_bytes = 0
    for row in rows[:, 1:].tolist():
        text_bytes += len(tokenizer.decode(row, clean_up_tokenization_spaces=False).encode("utf-8"))
    return text_bytes


def text_batch(
    tokenizer, text: str, seq_len: int, max_windows: int | None = None, source: str = "text"
) -> TextBatch:
    """Evaluation batch from arbitrary user text: [n, seq_len] windows with BOS."""
    check_text(text)
    check_tokenizer(tokenizer)
    check_window_args(seq_len, max_windows, "max_windows")
    if not text.strip():
        raise DataError("The text is empty. Type or upload some text to evaluate on.")
    bos_id = tokenizer.bos_token_id
    ids = tokenizer.encode(text, add_special_tokens=False)
    rows = windows_from_ids(ids, seq_len, bos_id, max_windows)
    return TextBatch(rows, _count_bytes(tokenizer, rows), bos_id is not None, source)


def code_batch(tokenizer, seq_len: int = 128, n_windows: int = 16) -> TextBatch:
    """The default LM evaluation batch: held-out stdlib source, concatenated in
    file order, cut into `n_windows` windows of `seq_len` tokens (BOS first).

    Windows are spread evenly over the held-out text so the batch samples many
    files, not just the first one.
    """
    check_tokenizer(tokenizer)
    check_window_args(seq_len, n_windows)
    text = "\n".join(b.decode("utf-8", errors="replace") for b in read_bytes(heldout_files()))
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos_id = tokenizer.bos_token_id
    body = seq_len - (1 if bos_id is not None else 0)
    total = len(ids) // body
    if total < n_windows:
        raise DataError(f"Held-out text gives only {total} windows of {body} tokens.")
    picks = np.linspace(0, total - 1, n_windows).round().astype(int)
    rows = [ids[i * body:(i + 1) * body] for i in picks]
    tokens = torch.tensor(rows, dtype=torch.long)
    if bos_id is not None:
        tokens = torch.cat([torch.full((n_windows, 1), bos_id, dtype=torch.long), tokens], 1)
    return TextBatch(tokens, _count_bytes(tokenizer, tokens),
                     bos_id is not None, f"held-out stdlib source ({n_windows}x{seq_len})")


def repeated_token_sequences(
    n: int, vocab: int, bos_id: int, seq_len: int, gen: torch.Generator,
    min_half: int = 6, max_half: int = 30,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The induction task: BOS, a block of h distinct random tokens (h varies per row),
    the same block again, then random filler. Returns tokens [n, seq_len] and a mask
    [n, seq_len], True on the repeated block from its second token on: those are
    predictable by induction (the first one is not: nothing says the copy starts)."""
    if seq_len < 1 + 2 * max_half:
        raise DataError(f"Sequences of {seq_len} tokens cannot hold BOS and two copies of "
                        f"{max_half} tokens; use at least {1 + 2 * max_half}.")
    if vocab < max_half:
        raise DataError(f"A vocabulary of {vocab} tokens cannot fill a block of {max_half} distinct tokens.")
    tokens = torch.randint(0, vocab, (n, seq_len), generator=gen)
    tokens[:, 0] = bos_id
    halves = torch.randint(min_half, max_half + 1, (n,), generator=gen)
    mask = torch.zeros(n, seq_len, dtype=torch.bool)
    for i, h in enumerate(halves.tolist()):
        # distinct tokens in the block: every copy has exactly one earlier occurrence to follow
        tokens[i, 1:1 + h] = torch.randperm(vocab, generator=gen)[:h]
        tokens[i, 1 + h:1 + 2 * h] = tokens[i, 1:1 + h]
        mask[i, 2 + h:1 + 2 * h] = True
    return tokens, mask


def repeated_tokens_batch(vocab: int, bos_id: int, seq_len: int, n: int = 64, seed: int = 99) -> TextBatch:
    """Fixed evaluation batch of the induction task (accuracy on the repeated half)."""
    tokens, mask = repeated_token_sequences(n, vocab, bos_id, seq_len, torch.Generator().manual_seed(seed))
    return TextBatch(tokens, 0, True, f"repeated random tokens ({n}x{seq_len})", mask)


# --------------------------------------------------------------------------- digits


def digits_batch(n: int | None = None, denoise: bool = False) -> ImageBatch:
    """Held-out digits: for a classifier the images and labels; for the denoiser
    noisy inputs (fixed seed) with the clean images as targets. `n`: the first n
    held-out images (all when None)."""
    if n is not None and (not _is_int(n) or n < 1):
        raise DataError(f"n must be a whole number of at least 1 (or None for all images); got {n!r}.")
    images, labels = digits_split("heldout")
    if n is not None:
        images, labels = images[:n], labels[:n]
    if denoise:
        return ImageBatch(add_digit_noise(images, seed=1234), labels, images,
                          f"held-out digits, noisy (std {DIGITS_NOISE_STD})")
    return ImageBatch(images, labels, None, "held-out digits")


# --------------------------------------------------------------------------- fit to a model


def check_batch(handle: Any, batch: object) -> None:
    """Refuse, before any forward, a batch that does not fit `handle` (a `ModelHandle`), with
    a `DataError` saying what is wrong and what to build instead. The batch's own fields are
    checked when it is built (`TextBatch`, `ImageBatch`). Against the model: a language
    model ("causal-lm") takes a `TextBatch`, an image model an `ImageBatch`; a classifier
    takes images without targets, the denoiser ("image-to-image") images with clean
    targets; token ids lie in 0..d_vocab-1 (not -1, not another tokenizer's ids) and a
    window is at most n_ctx tokens long; every image is [1, 8, 8] (`DIGIT_SHAPE`) with
    finite pixels."""
    check_handle(handle)
    if not isinstance(batch, (TextBatch, ImageBatch)):
        raise DataError(f"Expected a TextBatch or an ImageBatch from lib.data; got {type(batch).__name__}.")
    if handle.kind == "causal-lm":
        if not isinstance(batch, TextBatch):
            raise DataError("This is a language model: it reads token windows (a TextBatch), not images. "
                            "Use lib.data.default_batch(handle) or text_batch(handle.tokenizer, ...).")
        _check_tokens_fit(handle, batch.tokens)
        return
    if not isinstance(batch, ImageBatch):
        raise DataError(f"This is an image model ({handle.kind}): it reads digit images (an ImageBatch), "
                        "not token windows. Use lib.data.default_batch(handle).")
    if handle.kind == "image-classifier" and batch.targets is not None:
        raise DataError("This batch carries clean target images, so it is a denoising batch; a classifier is "
                        "measured on labels. Use lib.data.digits_batch() (without denoise=True).")
    if handle.kind == "image-to-image" and batch.targets is None:
        raise DataError("This batch has no target images, but a denoiser is measured against clean targets. "
                        "Use lib.data.digits_batch(denoise=True).")
    check_images(batch.images)


def check_lm(handle: Any, what: str, batch: object | None = None) -> None:
    """Refuse, before any forward, a model that is not a causal language model (a
    `CapabilityError` naming `what`, the view that needs one) and, given a `batch`, a batch
    that does not fit the model (`check_batch`). Every analysis of a language model's heads
    or residual stream starts with it."""
    check_handle(handle)
    if handle.kind != "causal-lm":
        raise CapabilityError(f"{what} need a transformer language model; this is an image model ({handle.kind}), "
                              "which has no attention heads and no residual stream of tokens.")
    if batch is not None:
        check_batch(handle, batch)


def _check_tokens_fit(handle: Any, tokens: torch.Tensor) -> None:
    """Token ids [batch, pos] within the model's vocabulary and context."""
    n_ctx, vocab = handle.structure.n_ctx, handle.structure.d_vocab
    if n_ctx and tokens.shape[1] > n_ctx:
        raise DataError(f"Windows of {tokens.shape[1]} tokens are longer than this model's context of {n_ctx} "
                        f"tokens. Use windows of at most {n_ctx} tokens (seq_len={n_ctx}).")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab:
        outside = int(((tokens < 0) | (tokens >= vocab)).sum())
        raise DataError(f"Token ids must lie in 0..{vocab - 1} for this model's vocabulary of {vocab} tokens; "
                        f"this batch holds ids from {low} to {high} ({outside} outside). Was it made with another "
                        "model's tokenizer? Build it with this model's (lib.data.default_batch(handle)).")


def check_images(images: torch.Tensor) -> None:
    """Images [batch, 1, 8, 8] with finite pixels, as every image model here reads."""
    if tuple(images.shape[1:]) != DIGIT_SHAPE:
        raise DataError(f"Each image must be {list(DIGIT_SHAPE)} (one grey 8x8 digit); got "
                        f"{list(images.shape[1:])}.")
    if not torch.isfinite(images).all():
        raise DataError("The images contain NaN or infinite pixels; use values in [0, 1].")


# --------------------------------------------------------------------------- dispatch


def default_batch(handle, n_windows: int | None = None, seq_len: int = 256) -> Batch:
    """The fixed evaluation batch that fits `handle` (a `ModelHandle`): LM windows of up to `seq_len`
    tokens (the context), as many (2 to 16) as keep parameters x tokens in EVAL_PARAMETER_TOKENS."""
    if handle.eval_task == "digits":
        return digits_batch()
    if handle.eval_task == "noisy-digits":
        return digits_batch(denoise=True)
    s = handle.structure
    if handle.eval_task == "repeated-tokens":
        return repeated_tokens_batch(s.d_vocab - 1, handle.tokenizer.bos_token_id, s.n_ctx)
    seq_len = min(seq_len, s.n_ctx)
    n_windows = n_windows or max(2, min(16, EVAL_PARAMETER_TOKENS // max(1, handle.n_params * seq_len)))
    return code_batch(handle.tokenizer, seq_len=seq_len, n_windows=n_windows)
