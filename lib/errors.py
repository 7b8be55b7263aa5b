"""The errors a user can cause. Each page has one guard that catches `LayerScopeError`
and shows its message; anything else is a bug and may surface as a traceback.

Every message says what was wrong and what to do about it.
"""

from __future__ import annotations


class LayerScopeError(ValueError):
    """Base of every error caused by user input (a model, a text, a setting, a recipe)."""


class ModelLoadError(LayerScopeError):
    """The model could not be loaded."""


class ModelNotFoundError(ModelLoadError):
    pass


class HubUnavailableError(ModelLoadError):
    pass


class NoCheckpointError(ModelLoadError):
    pass


class PickleRefusedError(ModelLoadError):
    pass


class RemoteCodeRefusedError(ModelLoadError):
    pass


class ModelTooLargeError(ModelLoadError):
    pass


class UnsupportedModelError(ModelLoadError):
    pass


class DataError(LayerScopeError):
    """An evaluation input (prompt, text, batch, image) cannot be used with this model."""


class AnalysisError(LayerScopeError):
    """The model or batch cannot be analysed this way; the message says why."""


class CapabilityError(AnalysisError):
    """The model's backend cannot do what was asked (e.g. run one block on an image model)."""


class RecipeError(LayerScopeError):
    """An edit or a recipe is invalid for this model (bad field, unknown type, other model)."""


def require_int(value: object, what: str, low: int, high: int) -> int:
    """`value` if it is a whole number in [low, high]; else a DataError saying which range."""
    import numbers

    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not low <= value <= high:
        raise DataError(f"{what} is a whole number from {low} to {high:,}, not {value!r}."[:300])
    return int(value)


def require_type(value: object, kind: type | tuple[type, ...], what: str) -> None:
    """A DataError naming what `what` must be when `value` is not a `kind`."""
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise DataError(f"{what} must be a {names}, not a {type(value).__name__} value.")
