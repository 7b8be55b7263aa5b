"""Pruning edits. So far: dropping a block, an attention or MLP sublayer, or an image
model's stage (METHODS §4, structured).

A dropped part contributes nothing to the residual stream (its output, bias
included, is zero): dropping block l gives y_l = x_l, attention l gives m_l = x_l,
MLP l gives y_l = m_l; a dropped image stage passes its input through. `Drop` is
both the recipe edit and the address the Redundancy view's drop sweep uses.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

from analysis.edits import Edit, applies, edit_type, is_int, require
from lib.errors import RecipeError
from lib.handle import ModelHandle

DROP_KINDS = ("block", "attention", "mlp", "stage")


@edit_type("drop")
@dataclass(frozen=True)
class Drop(Edit):
    """Remove one part: kind "block" | "attention" | "mlp" with a layer index, or
    "stage" with an image model's stage name."""

    kind: str
    layer: int | str

    def __post_init__(self) -> None:
        require(self.kind in DROP_KINDS, f"A drop's kind is one of {', '.join(DROP_KINDS)}, not {self.kind!r}.")
        if self.kind == "stage":
            require(isinstance(self.layer, str) and bool(self.layer),
                    f"A stage drop names the stage (e.g. 'conv2'), not {self.layer!r}.")
        else:
            require(is_int(self.layer) and self.layer >= 0,
                    f"A {self.kind} drop needs a layer index >= 0, not {self.layer!r}.")

    @property
    def part(self) -> str:
        """What is dropped, e.g. "attention 3" or "stage conv2"."""
        return f"{self.kind} {self.layer}"

    @property
    def label(self) -> str:
        return f"drop {self.part}"

    def check(self, handle: ModelHandle) -> None:
        reason = handle.drop_problem(self)
        if reason:
            raise RecipeError(reason)


@applies(Drop)
def _remove(handle: ModelHandle, edit: Drop) -> None:
    handle.remove_(edit)


@contextmanager
def dropping(handle: ModelHandle, drops: Sequence[Drop]) -> Iterator[ModelHandle]:
    """Inside the block, `handle` runs with `drops` removed through hooks (the weights
    are untouched; the hooks go on exit, also when the body raises). Duplicates count once."""
    with handle.dropping(list(dict.fromkeys(drops))):
        yield handle
