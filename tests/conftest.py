"""Shared fixtures: the tiny random model (built in-process, never downloaded)."""

import os
import tempfile

import numpy as np
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the session and every subprocess it starts (they run
# the same steps again): compiled programs are reused, outputs are the same executables' bits.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jengine-tests-xla-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

from jengine import Model, ModelConfig, init_params  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model() -> Model:
    cfg = ModelConfig.named("tiny")
    return Model(cfg, init_params(cfg, seed=0))


@pytest.fixture(scope="session")
def tiny_model_bf16() -> Model:
    cfg = ModelConfig.named("tiny").replace(dtype="bfloat16")
    return Model(cfg, init_params(cfg, seed=0))


def same_bits(a, b) -> bool:
    """Bitwise equality of float32 arrays: -0.0 and +0.0 (and NaN payloads) count as different."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def random_prompts(n: int, vocab: int, lo: int = 3, hi: int = 40, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [list(map(int, rng.integers(2, vocab, rng.integers(lo, hi)))) for _ in range(n)]
