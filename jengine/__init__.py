"""jengine: a JAX/Pallas LLM rollout engine whose logprobs are bitwise the trainer's.

Exports are loaded on first use (PEP 562), so importing a host-side module (`jengine.config`,
`jengine.allocator`, `jengine.scheduler`, `jengine.plan`) does not load jax.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {name: f"jengine.{module}" for module, names in {
    "config": ("EngineConfig", "ModelConfig", "Numerics", "RopeScaling", "SamplingParams"),
    "engine": ("Engine", "RequestOutput"),
    "models.loading": ("CheckpointError", "load_model", "save_model"),
    "models.transformer": ("Model", "init_params"),
    "scoring": ("score",),
    "tokenizer": ("load_tokenizer",),
}.items() for name in names}  # fmt: skip
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jengine' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
