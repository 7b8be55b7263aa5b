"""Handle methods that run holding the handle's lock."""

from __future__ import annotations

import functools
from typing import Any, Callable


def exclusive(method: Callable) -> Callable:
    """Run a handle method holding the handle's lock (see `ModelHandle.lock`)."""

    @functools.wraps(method)
    def locked(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return method(self, *args, **kwargs)

    return locked
