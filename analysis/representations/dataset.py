"""The probes' data: token windows of the model's evaluation text (the held-out standard
library source of `lib.data.code_batch`, cut the same way) with the properties of each
token read by `code_labels`, and the split into training and test windows.

A byte-level tokenizer (zoo:code-lm: one token per UTF-8 byte) maps token i to byte i of
the text, and so to the character that byte belongs to; another tokenizer needs offsets
(a fast Hugging Face tokenizer's `return_offsets_mapping`), and a token is labelled by
its first non-space character (GPT-2's " def" by its "d").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from analysis.representations.code_labels import MAX_BRACKET_DEPTH, MAX_INDENT, TOKEN_KINDS, UNLABELLED, label_source
from lib.corpus import heldout_files, read_bytes, stdlib_root
from lib.data import TextBatch, check_batch, check_lm, check_window_args
from lib.errors import CapabilityError, DataError
from lib.handle import ModelHandle

PROPERTIES = ("token_kind", "bracket_depth", "in_string_or_comment", "indent_level", "ast_node")
PROPERTY_NAMES = {"token_kind": "token kind", "bracket_depth": "bracket depth",
                  "in_string_or_comment": "inside a string or comment", "indent_level": "indentation level",
                  "ast_node": "AST node type"}
TOP_AST_TYPES = 10  # the most frequent node types are classes of their own; the rest are "other"
MAX_FEATURE_BYTES = 512 * 2**20  # recorded residual streams of every depth, float32
MAX_WINDOWS = 64


@dataclass(frozen=True)
class ProbeText:
    """Token windows of the evaluation text and each token's properties.

    tokens: [n, T] int64 token ids, BOS first when `has_bos`.
    labels: property -> [n, T] int64 class index into `classes[property]`, -1 where the
        token could not be labelled (BOS always).
    classes: property -> class names.
    window_file: [n] int64, index into `files` of the file each window starts in.
    files: the source files, relative to the standard library's folder.
    """

    tokens: torch.Tensor
    labels: dict[str, torch.Tensor]
    classes: dict[str, tuple[str, ...]]
    window_file: torch.Tensor
    files: tuple[str, ...]
    has_bos: bool
    source: str

    @property
    def n_positions(self) -> int:
        """Positions a probe could read: every token but the BOS column."""
        return int(self.tokens.shape[0] * (self.tokens.shape[1] - (1 if self.has_bos else 0)))

    def n_labelled(self, prop: str) -> int:
        return int((self.labels[prop] >= 0).sum())


def is_byte_level(tokenizer: Any) -> bool:
    """Whether token ids are the text's UTF-8 bytes (zoo:code-lm's tokenizer)."""
    sample = "def é(x):\n\treturn x  # ok\n"
    try:
        return list(tokenizer.encode(sample, add_special_tokens=False)) == list(sample.encode("utf-8"))
    except (TypeError, ValueError, AttributeError):
        return False


def _utf8_lengths(text: str) -> np.ndarray:
    """[n_chars] bytes of each character in UTF-8."""
    if text.isascii():
        return np.ones(len(text), dtype=np.int64)
    points = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
    return 1 + (points >= 0x80) + (points >= 0x800) + (points >= 0x10000).astype(np.int64)


def token_characters(tokenizer: Any, text: str) -> tuple[list[int], np.ndarray]:
    """The text's token ids (no special tokens) and, for each, the index of the character
    that labels it. A tokenizer that is neither byte-level nor gives offsets is refused."""
    if is_byte_level(tokenizer):
        lengths = _utf8_lengths(text)
        return list(text.encode("utf-8")), np.repeat(np.arange(len(text), dtype=np.int64), lengths)
    try:
        encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    except (NotImplementedError, TypeError, ValueError) as e:
        raise CapabilityError("Probes need to know which characters of the text each token covers: this model's "
                              "tokenizer is not byte-level and gives no offsets (a fast Hugging Face tokenizer "
                              f"does: return_offsets_mapping). ({type(e).__name__})") from None
    chars = []
    for begin, end in encoded["offset_mapping"]:
        piece = text[begin:end]
        chars.append(begin + (len(piece) - len(piece.lstrip())) if piece.strip() else begin)
    return list(encoded["input_ids"]), np.array(chars, dtype=np.int64)


def default_windows(handle: ModelHandle, seq_len: int) -> int:
    """Windows whose residual streams at every depth fit MAX_FEATURE_BYTES (4 to MAX_WINDOWS)."""
    s = handle.structure
    per_window = (s.n_layers + 1) * seq_len * max(1, s.d_model) * 4
    return int(min(MAX_WINDOWS, max(4, MAX_FEATURE_BYTES // per_window)))


def _text_labels(texts: list[str]) -> tuple[dict[str, np.ndarray], tuple[str, ...], np.ndarray]:
    """Per-character labels of the texts joined by "\\n" (the joins unlabelled), the AST
    node names they index, and where each text starts."""
    parts = {p: [] for p in PROPERTIES}
    names: dict[str, int] = {}
    starts = []
    offset = 0
    for text in texts:
        labels = label_source(text)
        starts.append(offset)
        for p in PROPERTIES[:-1]:
            parts[p] += [getattr(labels, p), np.full(1, UNLABELLED, dtype=np.int64)]
        remap = np.array([names.setdefault(n, len(names)) for n in labels.ast_names] + [UNLABELLED], dtype=np.int64)
        parts["ast_node"] += [remap[labels.ast_node], np.full(1, UNLABELLED, dtype=np.int64)]  # -1 indexes the tail
        offset += len(text) + 1
    joined = {p: np.concatenate(v)[:-1] for p, v in parts.items()}
    return joined, tuple(sorted(names, key=names.get)), np.array(starts, dtype=np.int64)


def _merge_rare(codes: np.ndarray, names: tuple[str, ...]) -> tuple[np.ndarray, tuple[str, ...]]:
    """Keep the TOP_AST_TYPES most frequent node types (among labelled tokens) as classes,
    the others become "other" (ties broken by name, so the classes are deterministic)."""
    found = codes[codes >= 0]
    counts = np.bincount(found, minlength=len(names))
    order = sorted(range(len(names)), key=lambda i: (-counts[i], names[i]))
    kept = [i for i in order if counts[i] > 0][:TOP_AST_TYPES]
    rare = len([i for i in order if counts[i] > 0]) > len(kept)
    table = np.full(len(names) + 1, UNLABELLED, dtype=np.int64)
    for new, old in enumerate(kept):
        table[old] = new
    if rare:
        table[[i for i in range(len(names)) if i not in kept]] = len(kept)
    merged = np.where(codes >= 0, table[codes], UNLABELLED)
    return merged, tuple(names[i] for i in kept) + (("other",) if rare else ())


def probe_text(handle: ModelHandle, n_windows: int | None = None, seq_len: int = 256) -> ProbeText:
    """Windows of the evaluation text for `handle` (a language model with a tokenizer) and
    the properties of their tokens. Windows are picked as `lib.data.code_batch` picks them,
    so with its window count and length they are exactly the evaluation batch; by default
    as many windows (4 to 64) as keep every depth's residual stream under 512 MiB."""
    check_lm(handle, "Linear probes of code properties")
    if handle.tokenizer is None:
        raise CapabilityError("Probes read properties of the text each token comes from; this model has no "
                              "tokenizer to map its tokens back to the text.")
    seq_len = min(seq_len, handle.structure.n_ctx or seq_len)
    check_window_args(seq_len, n_windows)
    n_windows = n_windows or default_windows(handle, seq_len)
    paths = heldout_files()
    texts = [b.decode("utf-8", errors="replace") for b in read_bytes(paths)]
    text = "\n".join(texts)
    ids, chars = token_characters(handle.tokenizer, text)
    bos_id = handle.tokenizer.bos_token_id
    body = seq_len - (1 if bos_id is not None else 0)
    total = len(ids) // body
    if total < n_windows:
        raise DataError(f"The held-out text gives only {total} windows of {body} tokens; ask for at most {total}.")
    picks = np.linspace(0, total - 1, n_windows).round().astype(int)
    index = (picks[:, None] * body + np.arange(body)[None, :])  # [n, body] token positions in the text
    ids_array = np.asarray(ids, dtype=np.int64)
    rows, char_rows = ids_array[index], chars[index]  # [n, body] each
    per_char, ast_names, file_starts = _text_labels(texts)
    per_char["ast_node"], ast_classes = _merge_rare(per_char["ast_node"], ast_names)
    classes = {"token_kind": TOKEN_KINDS, "bracket_depth": _capped(MAX_BRACKET_DEPTH),
               "in_string_or_comment": ("no", "yes"), "indent_level": _capped(MAX_INDENT), "ast_node": ast_classes}
    labels = {}
    for p in PROPERTIES:
        values = torch.from_numpy(per_char[p][char_rows])  # [n, body]
        if bos_id is not None:
            values = torch.cat([torch.full((n_windows, 1), UNLABELLED, dtype=torch.long), values], 1)
        labels[p] = values
    tokens = torch.from_numpy(rows)
    if bos_id is not None:
        tokens = torch.cat([torch.full((n_windows, 1), bos_id, dtype=torch.long), tokens], 1)
    check_batch(handle, TextBatch(tokens, 0, bos_id is not None, "probe windows"))
    window_file = torch.from_numpy(np.searchsorted(file_starts, char_rows[:, 0], side="right") - 1)
    root = stdlib_root()
    return ProbeText(tokens, labels, classes, window_file, tuple(p.relative_to(root).as_posix() for p in paths),
                     bos_id is not None, f"held-out stdlib source ({n_windows}x{seq_len})")


def _capped(top: int) -> tuple[str, ...]:
    return tuple(str(i) for i in range(top)) + (f"{top}+",)
