"""A compression recipe: an ordered list of edits to the base model.

Each edit is a small frozen config that validates its own fields. So far a recipe
holds module drops (from the Redundancy view); applying it runs the base model with
those modules removed through hooks that are always removed afterwards, so the
base model itself is never touched.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Iterator

from analysis.layer_drop import MODULE_KINDS, Module, dropped
from lib.handle import ModelHandle


@dataclass(frozen=True)
class DropConfig:
    """Remove one module: kind "block" | "attention" | "mlp" (layer index) or
    "stage" (an image model's stage name)."""

    kind: str
    layer: int | str

    def __post_init__(self) -> None:
        if self.kind not in MODULE_KINDS + ("stage",):
            raise ValueError(f"DropConfig.kind must be one of {MODULE_KINDS + ('stage',)}, got {self.kind!r}")
        if self.kind != "stage" and (not isinstance(self.layer, int) or self.layer < 0):
            raise ValueError(f"DropConfig.layer must be a layer index >= 0, got {self.layer!r}")

    @property
    def module(self) -> Module:
        return Module(self.kind, self.layer)

    @property
    def label(self) -> str:
        return f"drop {self.module.label}"


Edit = DropConfig


@dataclass
class Recipe:
    """Edits in the order they were added, for the model with `fingerprint`."""

    fingerprint: str
    edits: list[Edit] = field(default_factory=list)

    def add(self, edit: Edit) -> bool:
        """Append `edit` unless it is already there; True if it was added."""
        if edit in self.edits:
            return False
        self.edits.append(edit)
        return True

    def undo(self) -> Edit | None:
        return self.edits.pop() if self.edits else None

    def to_json(self) -> str:
        return json.dumps({"fingerprint": self.fingerprint,
                           "edits": [{"type": type(e).__name__, **asdict(e)} for e in self.edits]}, indent=2)


@contextmanager
def applied(handle: ModelHandle, recipe: Recipe) -> Iterator[ModelHandle]:
    """Run `handle` with the recipe's edits inside the block; the base is untouched."""
    if recipe.fingerprint != handle.fingerprint:
        raise ValueError("This recipe was made for a different model.")
    with dropped(handle, [e.module for e in recipe.edits if isinstance(e, DropConfig)]):
        yield handle
