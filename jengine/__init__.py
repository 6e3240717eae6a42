"""jengine: a JAX/Pallas LLM rollout engine whose logprobs are bitwise the trainer's."""

from jengine.config import EngineConfig, ModelConfig, RopeScaling, SamplingParams
from jengine.models.transformer import Model, init_params
from jengine.scoring import score

__all__ = [
    "EngineConfig",
    "Model",
    "ModelConfig",
    "RopeScaling",
    "SamplingParams",
    "init_params",
    "score",
]
