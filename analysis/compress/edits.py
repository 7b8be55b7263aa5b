"""Tagged recipe edits and the one verb that applies them.

Every edit is a small frozen dataclass with a stable `type` name that validates its
own fields (raising `RecipeError`); `apply_(handle, edit)` dispatches on the edit's
class through a registry and refuses an edit it does not know. Edits only ever act
in place on a private copy (the trailing underscore), never on a loaded base model.

    @edit_type("drop")
    @dataclass(frozen=True)
    class Drop(Edit): ...

    @applies(Drop)
    def _remove(handle, edit): handle.remove_(edit)
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Any, Callable, ClassVar, Iterator, TypeVar

import torch

from lib.errors import LayerScopeError, RecipeError
from lib.handle import ModelHandle
from lib.progress import Progress, telling, told_here

E = TypeVar("E", bound="Edit")

EDIT_TYPES: dict[str, type["Edit"]] = {}
_APPLY: dict[type["Edit"], Callable[[ModelHandle, Any], None]] = {}


class Edit:
    """Base of every recipe edit. Subclasses are frozen dataclasses registered with
    `edit_type`; `label` says what the edit does in a few words."""

    type: ClassVar[str] = ""

    @property
    def label(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))
        return f"{self.type} ({fields})"

    def check(self, handle: ModelHandle) -> None:
        """Raise RecipeError if this edit does not fit `handle` (called before applying)."""

    def calibration_forwards(self, handle: ModelHandle, positions: int) -> float:
        """What applying it costs, in forwards of `positions` positions (the evaluation
        batch's, `positions_of`): 0 for an edit that only rewrites weights; an edit that
        calibrates on activations counts its forwards and work."""
        return 0.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def edit_type(name: str) -> Callable[[type[E]], type[E]]:
    """Class decorator: register an edit class under its stable JSON `type` name."""

    def register(cls: type[E]) -> type[E]:
        if name in EDIT_TYPES and EDIT_TYPES[name] is not cls:
            raise ValueError(f"edit type {name!r} is registered twice")
        cls.type = name
        EDIT_TYPES[name] = cls
        return cls

    return register


def applies(cls: type[E]) -> Callable[[Callable[[ModelHandle, E], None]], Callable[[ModelHandle, E], None]]:
    """Function decorator: `fn(handle, edit)` applies edits of class `cls` in place."""

    def register(fn: Callable[[ModelHandle, E], None]) -> Callable[[ModelHandle, E], None]:
        _APPLY[cls] = fn
        return fn

    return register


def apply_(handle: ModelHandle, edit: Edit, progress: Progress | None = None) -> None:
    """Apply `edit` in place to `handle`, which must be a private copy; an edit that runs
    forwards (`calibration_forward`) tells `progress` of their blocks. An unexpected failure
    inside becomes a RecipeError naming the edit, so a page shows a message and keeps its
    recipe instead of a traceback."""
    if handle.base_fingerprint is None:
        raise RecipeError("Edits apply to a private copy (`handle.private_copy()`), never to a loaded base model.")
    fn = _APPLY.get(type(edit))
    if fn is None:
        raise RecipeError(f"There is no way to apply a {type(edit).__name__} edit "
                          f"(known: {', '.join(sorted(EDIT_TYPES))}).")
    edit.check(handle)
    try:
        with telling(progress):
            fn(handle, edit)
    except LayerScopeError:
        raise
    except Exception as e:  # noqa: BLE001 - reported to the user with the edit that caused it
        raise RecipeError(f"'{edit.label}' could not be applied to this model ({type(e).__name__}: {e}). "
                          "The recipe is unchanged.") from e
    handle.weights_changed()


def positions_of(inputs: torch.Tensor) -> int:
    """Positions a forward of `inputs` runs each linear layer on: tokens [batch, T] of an LM;
    an image model's images (a convolution's reuse over pixels is left out)."""
    return inputs.shape[0] * (inputs.shape[1] if inputs.dim() == 2 else 1)


@contextmanager
def calibration_forward(handle: ModelHandle, k: int = 0, forwards: int = 1, share: float = 1.0) -> Iterator[None]:
    """Inside, the blocks of the k-th of an edit's `forwards` calibration forwards move the
    bar of the edit being applied (`apply_`'s progress) over its first `share`."""
    tell = told_here()
    if tell is None:
        yield
        return
    what = f"calibration forward {k + 1} of {forwards}" if forwards > 1 else "calibration forward"
    with handle.told_of_blocks(lambda b, n: tell(share * (k + b / n) / forwards, f"{what}: {b} of {n} blocks")):
        yield


MAX_MESSAGE = 400  # characters of an edit's refusal: a recipe field can be a megabyte, the message stays short


def cut(text: str, limit: int = 60) -> str:
    """`text` cut to `limit` characters: what a message may quote of a user's text."""
    return text if len(text) <= limit else text[:limit] + "..."


def shown(value: Any, limit: int = 60) -> str:
    """`repr(value)` cut to `limit` characters."""
    return cut(repr(value), limit)


MAX_NESTING = 8  # an edit's values nest at most two deep: a per-layer sparsity is a tuple of (name, sparsity)


def _tuples(value: Any, depth: int = 0) -> Any:
    """JSON lists back as the tuples `to_dict` wrote, nested ones too (a per-layer sparsity
    is a tuple of (name, sparsity) pairs); lists nested deeper than MAX_NESTING are refused."""
    if not isinstance(value, list):
        return value
    if depth >= MAX_NESTING:
        raise RecipeError(f"An edit's values nest lists more than {MAX_NESTING} deep; no edit's do.")
    return tuple(_tuples(v, depth + 1) for v in value)


def from_dict(data: Any) -> Edit:
    """The edit a `to_dict()` dictionary describes; unknown types, unknown or missing
    fields and wrongly typed values are refused with a RecipeError naming them."""
    if not isinstance(data, dict):
        raise RecipeError('An edit must be a JSON object like {"type": "drop", ...}, '
                          f"not a {type(data).__name__}.")
    name = data.get("type")
    if not isinstance(name, str) or name not in EDIT_TYPES:
        raise RecipeError(f"Unknown edit type {shown(name)}; known types: {', '.join(sorted(EDIT_TYPES))}.")
    cls = EDIT_TYPES[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    given = {k: v for k, v in data.items() if k != "type"}
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise RecipeError(f"A {name} edit has no field(s) {', '.join(cut(str(k)) for k in unknown[:5])}; its "
                          f"fields are {', '.join(fields)}.")
    missing = [n for n, f in fields.items() if n not in given and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise RecipeError(f"A {name} edit needs the field(s) {', '.join(missing)}.")
    values = {k: _tuples(v) for k, v in given.items()}
    try:
        return cls(**values)
    except RecipeError:
        raise
    except (TypeError, ValueError) as e:
        raise RecipeError(f"A {name} edit is not valid: {str(e)[:MAX_MESSAGE]}") from e


def require(condition: bool, message: str) -> None:
    """Raise RecipeError(message) unless `condition` (for edits' __post_init__); a message
    that quotes a huge value is cut to MAX_MESSAGE characters."""
    if not condition:
        raise RecipeError(message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE] + "...")


def is_int(value: Any) -> bool:
    """An integer that is not a bool (JSON true would otherwise pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)
