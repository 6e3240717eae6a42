"""Runnable examples (`python -m jengine.examples.<name>`); they need the `examples` extra."""

import importlib
from types import ModuleType


def require(module: str) -> ModuleType:
    """`import module`, or an ImportError that names the extra providing it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"jengine's examples need {module!r}: pip install 'jengine[examples]'"
        ) from e
