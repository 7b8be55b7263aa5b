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
