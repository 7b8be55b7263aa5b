"""Properties of every character of Python source, read with Python's own `tokenize` and
`ast` (no hand-written rules): what the linear probes are asked to recover.

    token_kind            name | keyword | operator | number | string | comment (the
                          tokenize token covering the character; whitespace, newlines and
                          indentation are no token of these kinds and stay unlabelled)
    bracket_depth         brackets (), [], {} enclosing the character, counted from
                          tokenize's OP tokens (so a bracket inside a string does not count);
                          a bracket itself sits at the depth outside it; 3 means 3 or more
    in_string_or_comment  1 inside a STRING or COMMENT token, else 0
    indent_level          INDENT minus DEDENT tokens before the character's line (the block
                          nesting tokenize sees); 4 means 4 or more; blank and comment-only
                          lines, which tokenize gives no indentation, stay unlabelled
    ast_node              the type of the innermost `ast` node whose source span covers the
                          character (`Name`, `Call`, `FunctionDef`, ...; none outside every
                          node: blank lines, comments between statements)

Text that does not tokenize or parse as a whole is labelled chunk by chunk (top-level
pieces starting at an unindented line after a blank line); a chunk that still fails stays
unlabelled (-1), and the probes say how many positions were labelled.
"""

from __future__ import annotations

import ast
import io
import keyword
import re
import tokenize
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

TOKEN_KINDS = ("name", "keyword", "operator", "number", "string", "comment")
MAX_BRACKET_DEPTH, MAX_INDENT = 3, 4
UNLABELLED = -1
_STRINGS = {tokenize.STRING, *(getattr(tokenize, n) for n in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END")
                               if hasattr(tokenize, n))}
_OPEN, _CLOSE = set("([{"), set(")]}")
_CHUNK_START = re.compile(r"\n\s*\n(?=[^\s#])")  # a blank line, then an unindented line that is not a comment


@dataclass(frozen=True)
class CharLabels:
    """Labels of each character of a source text: int64 arrays [n_chars], -1 unlabelled.

    token_kind: index into TOKEN_KINDS; bracket_depth: 0..MAX_BRACKET_DEPTH;
    in_string_or_comment: 0 | 1; indent_level: 0..MAX_INDENT; ast_node: index into
    `ast_names`. n_chunks, failed_chunks: pieces the text was read in, and those that
    `tokenize` or `ast` refused (their characters stay unlabelled for that reader).
    """

    token_kind: np.ndarray
    bracket_depth: np.ndarray
    in_string_or_comment: np.ndarray
    indent_level: np.ndarray
    ast_node: np.ndarray
    ast_names: tuple[str, ...]
    n_chunks: int = 1
    failed_chunks: int = 0

    def ast_name_at(self, index: int) -> str | None:
        code = int(self.ast_node[index])
        return None if code == UNLABELLED else self.ast_names[code]


def _line_starts(source: str, breaks: str) -> np.ndarray:
    """Offset of each line's first character (line 1 first). `breaks` "tokenize": only
    "\\n" ends a line (what `tokenize` on a StringIO sees); "ast": "\\r\\n", "\\r" and "\\n"."""
    pattern = r"\n" if breaks == "tokenize" else r"\r\n|\r|\n"
    return np.array([0] + [m.end() for m in re.finditer(pattern, source)], dtype=np.int64)


def _tokenize_labels(source: str, out: dict[str, np.ndarray]) -> bool:
    """Fill token kind, bracket depth, string/comment and indent labels of `source` into
    `out` (arrays of len(source)); False (nothing written) when tokenize refuses it or
    its positions do not match the text."""
    starts = _line_starts(source, "tokenize")
    n = len(source)
    kind = np.full(n, UNLABELLED, dtype=np.int64)
    inside = np.zeros(n, dtype=np.int64)
    delta = np.zeros(n + 1, dtype=np.int64)  # bracket depth = running sum of +1 after "(" and -1 at ")"
    level_marks: list[tuple[int, int]] = []  # (offset, indent level from there on)
    level, last_row = 0, 0
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.INDENT:
                level += 1
                continue
            if tok.type == tokenize.DEDENT:
                level -= 1
                continue
            if tok.type == tokenize.ENDMARKER:
                break
            begin = int(starts[tok.start[0] - 1]) + tok.start[1]
            end = int(starts[tok.end[0] - 1]) + tok.end[1]
            if tok.string and source[begin:end] != tok.string:
                return False  # the text's lines and tokenize's differ: trust neither
            if tok.start[0] != last_row:  # first token of a physical line: the whole line gets this level
                blank = tok.type in (tokenize.COMMENT, tokenize.NL)  # tokenize gives such lines no indent
                level_marks.append((int(starts[tok.start[0] - 1]), UNLABELLED if blank else level))
                last_row = tok.start[0]
            if tok.type == tokenize.NAME:
                kind[begin:end] = TOKEN_KINDS.index("keyword" if keyword.iskeyword(tok.string) else "name")
            elif tok.type == tokenize.OP:
                kind[begin:end] = TOKEN_KINDS.index("operator")
                if tok.string in _OPEN:
                    delta[end] += 1
                elif tok.string in _CLOSE:
                    delta[begin] -= 1
            elif tok.type == tokenize.NUMBER:
                kind[begin:end] = TOKEN_KINDS.index("number")
            elif tok.type in _STRINGS:
                kind[begin:end] = TOKEN_KINDS.index("string")
                inside[begin:end] = 1
            elif tok.type == tokenize.COMMENT:
                kind[begin:end] = TOKEN_KINDS.index("comment")
                inside[begin:end] = 1
    except (tokenize.TokenError, SyntaxError):  # IndentationError is a SyntaxError
        return False
    indent = np.full(n, UNLABELLED, dtype=np.int64)
    for (offset, value), (following, _) in zip(level_marks, level_marks[1:] + [(n, 0)]):
        indent[offset:following] = value
    out["token_kind"][:] = kind
    out["in_string_or_comment"][:] = inside
    out["bracket_depth"][:] = np.clip(np.cumsum(delta[:n]), 0, MAX_BRACKET_DEPTH)
    out["indent_level"][:] = np.minimum(indent, MAX_INDENT)
    return True


def _char_column(line: str, byte_column: int) -> int:
    """`ast` columns count UTF-8 bytes of the line; the labels count characters."""
    if line.isascii():
        return byte_column
    return len(line.encode("utf-8")[:byte_column].decode("utf-8", errors="ignore"))


def _ast_labels(source: str, out: np.ndarray, names: dict[str, int]) -> bool:
    """Paint each character with the innermost ast node covering it (index into `names`,
    which grows as new node types appear); False when `ast.parse` refuses the text."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False
    starts = _line_starts(source, "ast")
    lines = [source[a:b] for a, b in zip(starts, list(starts[1:]) + [len(source)])]
    spans = []
    for node in ast.walk(tree):  # breadth first: a parent comes before its children
        if getattr(node, "end_lineno", None) is None or getattr(node, "col_offset", None) is None:
            continue
        begin = int(starts[node.lineno - 1]) + _char_column(lines[node.lineno - 1], node.col_offset)
        end = int(starts[node.end_lineno - 1]) + _char_column(lines[node.end_lineno - 1], node.end_col_offset)
        if end > begin:
            spans.append((end - begin, begin, end, type(node).__name__))
    painted = np.full(len(source), UNLABELLED, dtype=np.int64)
    for _, begin, end, name in sorted(spans, key=lambda s: -s[0]):  # stable: equal spans keep parent first
        painted[begin:end] = names.setdefault(name, len(names))
    out[:] = painted
    return True


def _chunks(source: str) -> list[tuple[int, int]]:
    """(start, end) of top-level pieces: split before an unindented line that follows a blank line."""
    cuts = [0] + [m.end() for m in _CHUNK_START.finditer(source)] + [len(source)]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


@lru_cache(maxsize=256)
def label_source(source: str) -> CharLabels:
    """Labels of every character of one Python source text (a file, or any text: what
    does not tokenize or parse as a whole is read chunk by chunk). Cached by the text."""
    n = len(source)
    out = {p: np.full(n, UNLABELLED, dtype=np.int64)
           for p in ("token_kind", "bracket_depth", "in_string_or_comment", "indent_level")}
    node = np.full(n, UNLABELLED, dtype=np.int64)
    names: dict[str, int] = {}
    n_chunks, failed = 1, 0
    whole_tokens = _tokenize_labels(source, out)
    whole_ast = _ast_labels(source, node, names)
    if not (whole_tokens and whole_ast):
        pieces = _chunks(source)
        n_chunks = len(pieces)
        for begin, end in pieces:
            chunk = source[begin:end]
            ok = True
            if not whole_tokens:
                view = {p: a[begin:end] for p, a in out.items()}
                ok &= _tokenize_labels(chunk, view)
            if not whole_ast:
                ok &= _ast_labels(chunk, node[begin:end], names)
            failed += not ok
    return CharLabels(out["token_kind"], out["bracket_depth"], out["in_string_or_comment"], out["indent_level"],
                      node, tuple(sorted(names, key=names.get)), n_chunks, failed)
