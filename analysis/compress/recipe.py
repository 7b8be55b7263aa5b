"""A compression recipe: the ordered list of edits that turns a base model into the
edited one. The recipe is the source of truth: the edited model is
`build(base, recipe)` = a private copy of the base with the edits applied in order,
and it is identified by the base fingerprint plus a digest of the recipe.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from analysis.compress.edits import Edit, apply_, cut, from_dict, shown
from analysis.compress.exits import rule  # noqa: F401 - importing an edit family registers its edit types
from analysis.compress.prune import allocation, factorize, pruning  # noqa: F401
from analysis.compress.quant import quantize  # noqa: F401
from lib.errors import RecipeError
from lib.handle import ModelHandle

FORMAT = "layerscope-recipe/1"
MAX_EDITS = 200  # every rebuild applies every edit to a fresh copy (~0.1 s each on the smallest model)
MAX_RECIPE_BYTES = 256 * 1024  # 200 edits take a few KiB of JSON


@dataclass
class Recipe:
    """Edits in order, for the base model with `fingerprint` (`model`: its name, for messages)."""

    fingerprint: str
    edits: list[Edit] = field(default_factory=list)
    model: str = ""

    def add(self, edit: Edit) -> bool:
        """Append `edit` unless it is already there; True if it was added."""
        if edit in self.edits:
            return False
        self.edits.append(edit)
        return True

    def remove(self, index: int) -> Edit:
        self._check_index(index)
        return self.edits.pop(index)

    def move(self, index: int, to: int) -> None:
        self._check_index(index)
        self._check_index(to)
        self.edits.insert(to, self.edits.pop(index))

    def undo(self) -> Edit | None:
        """Remove the last edit (None if there is none)."""
        return self.edits.pop() if self.edits else None

    def _check_index(self, index: int) -> None:
        if not 0 <= index < len(self.edits):
            raise RecipeError(f"The recipe has {len(self.edits)} edit(s); there is no edit number {index + 1}.")

    @property
    def digest(self) -> str:
        """Hash of the edits in order (16 hex digits); '' for an empty recipe."""
        if not self.edits:
            return ""
        text = json.dumps([e.to_dict() for e in self.edits], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def key(self) -> str:
        """Cache key of the edited model: base fingerprint + recipe digest."""
        return f"{self.fingerprint}+{self.digest}" if self.edits else self.fingerprint

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "model": self.model, "fingerprint": self.fingerprint,
                "edits": [e.to_dict() for e in self.edits]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Any) -> "Recipe":
        if not isinstance(data, dict) or not isinstance(data.get("edits"), list):
            raise RecipeError('A recipe is a JSON object with "fingerprint" and a list of "edits".')
        unknown = sorted(map(str, set(data) - {"format", "model", "fingerprint", "edits"}))
        if unknown:
            raise RecipeError(f"A recipe has no field(s) {', '.join(cut(k) for k in unknown[:5])}; its fields are "
                              "format, model, fingerprint, edits.")
        if data.get("format", FORMAT) != FORMAT:
            raise RecipeError(f"This recipe's format is {shown(data['format'])}; LayerScope reads {FORMAT!r}.")
        if not isinstance(data.get("fingerprint"), str):
            raise RecipeError('A recipe names the model it was made for in "fingerprint" (a string).')
        if len(data["edits"]) > MAX_EDITS:  # every rebuild applies every edit to a fresh copy
            raise RecipeError(f"The recipe lists {len(data['edits']):,} edits; LayerScope applies at most {MAX_EDITS}.")
        return cls(data["fingerprint"], [from_dict(e) for e in data["edits"]], str(data.get("model", "")))

    @classmethod
    def from_json(cls, text: str | bytes) -> "Recipe":
        if len(text) > MAX_RECIPE_BYTES:
            raise RecipeError(f"The recipe file is {len(text) / 1024:.0f} KiB; a recipe of {MAX_EDITS} edits takes "
                              f"a few KiB, and LayerScope reads at most {MAX_RECIPE_BYTES // 1024} KiB.")
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RecipeError(f"The recipe file is not valid JSON ({e}).") from e
        except RecursionError:
            raise RecipeError("The recipe file nests lists or objects too deeply to be a recipe.") from None
        return cls.from_dict(data)


def check_for(recipe: Recipe, handle: ModelHandle) -> None:
    """Refuse a recipe made for another model (its fingerprint is not `handle`'s). Whether
    its edits fit the model is checked when they are applied (`build`, `Lab.apply`)."""
    if recipe.fingerprint != handle.fingerprint:
        made_for = f" ({cut(recipe.model)})" if recipe.model else ""
        raise RecipeError(f"This recipe was made for another model{made_for}, fingerprint "
                          f"{cut(recipe.fingerprint)}; the loaded model {handle.spec} has {handle.fingerprint}.")


def build(base: ModelHandle, recipe: Recipe) -> ModelHandle:
    """The edited model: a private copy of `base` with the recipe's edits applied in
    order. The base is never touched."""
    check_for(recipe, base)
    edited = base.private_copy()
    for edit in recipe.edits:
        apply_(edited, edit)
    return edited
