"""jengine: a JAX/Pallas LLM rollout engine whose logprobs are bitwise the trainer's."""

from jengine.config import EngineConfig, ModelConfig, RopeScaling, SamplingParams
from jengine.engine import Engine, RequestOutput
from jengine.models.loading import CheckpointError, load_model, save_model
from jengine.models.transformer import Model, init_params
from jengine.scoring import score
from jengine.tokenizer import load_tokenizer

__all__ = [
    "CheckpointError",
    "Engine",
    "EngineConfig",
    "Model",
    "ModelConfig",
    "RequestOutput",
    "RopeScaling",
    "SamplingParams",
    "init_params",
    "load_model",
    "load_tokenizer",
    "save_model",
    "score",
]
