"""Shared fixtures: the tiny random model (built in-process, never downloaded)."""

import atexit
import os
import shutil
import tempfile

import numpy as np
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the session and every subprocess it starts: a module
# compiles what an earlier one did again (the fixture below drops the in-memory programs after
# each module) and the subprocesses run the session's steps again. A cached executable is the
# compiled program itself: loading it changes no bit. Removed when the session ends.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jengine-tests-xla-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

from jengine import Model, ModelConfig, init_params  # noqa: E402


def _memory_maps() -> int:
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux
        return 0


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs(request):
    """Drops every compiled program after each test module. XLA:CPU maps a few memory regions
    per executable and never unmaps them while jax's caches hold it; one process running the whole
    suite would otherwise reach the kernel's per-process limit (vm.max_map_count, 65530 by
    default), where LLVM's next allocation fails and the process dies with SIGSEGV."""
    yield
    log = os.environ.get("JENGINE_TEST_MAPS_LOG")
    before = _memory_maps() if log else 0
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
    if log:
        with open(log, "a") as f:
            f.write(f"{request.module.__name__} {before} {_memory_maps()}\n")


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
