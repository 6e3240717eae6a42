"""jengine: a JAX/Pallas LLM rollout engine whose logprobs are bitwise the trainer's.

Exports are loaded on first use (PEP 562), so importing a host-side module (`jengine.config`,
`jengine.allocator`, `jengine.scheduler`, `jengine.plan`) does not load jax.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CheckpointError": "jengine.models.loading",
    "Engine": "jengine.engine",
    "EngineConfig": "jengine.config",
    "Model": "jengine.models.transformer",
    "ModelConfig": "jengine.config",
    "Numerics": "jengine.config",
    "RequestOutput": "jengine.engine",
    "RopeScaling": "jengine.config",
    "SamplingParams": "jengine.config",
    "init_params": "jengine.models.transformer",
    "load_model": "jengine.models.loading",
    "load_tokenizer": "jengine.tokenizer",
    "save_model": "jengine.models.loading",
    "score": "jengine.scoring",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jengine' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
