"""The whole engine on the Mosaic TPU kernels under Pallas' TPU interpreter
(`kernel_backend="tpu_interpret"`: race detection, out-of-bounds checks, NaN-filled uninitialised
memory) with the engine's real page tables: rollout == `score` bitwise, and outputs independent of
batch, page size and prefix caching. Public API only.

TPU interpret mode simulates every DMA in Python, so the model is one layer of `tiny` with one
KV head and each request makes 3 tokens.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import jengine
from jengine import Engine, EngineConfig, Model, ModelConfig, SamplingParams, init_params

BACKEND = "tpu_interpret"
PREFIX = list(range(100, 116))  # one full page of 16: the siblings' shared prefix
PROMPTS = [PREFIX + [7, 8], PREFIX + [9], [30, 31, 32, 33, 34]]
PARAMS = [
    SamplingParams(temperature=1.0, max_tokens=3, seed=1),
    SamplingParams(temperature=0.7, top_k=20, max_tokens=3, seed=2),
    SamplingParams(temperature=0.0, max_tokens=3, seed=3),
]


@pytest.fixture(scope="module")
def model() -> Model:
    cfg = ModelConfig.named("tiny").replace(num_layers=1, num_kv_heads=1)
    return Model(cfg, init_params(cfg, seed=0))


def generate(model: Model, prompts, params, **config):
    engine = Engine(model, EngineConfig(kernel_backend=BACKEND, max_model_len=64, **config))
    return engine.generate(prompts, params), engine


def score(engine: Engine, model: Model, prompts, completions, params) -> list[np.ndarray]:
    """`jengine.score` with the engine's numerics (its backend included), before and after the
    redesign of the scorer's arguments."""
    if "kernel_backend" in inspect.signature(jengine.score).parameters:
        return jengine.score(model, prompts, completions, params, kernel_backend=BACKEND)
    return jengine.score(model, prompts, completions, params, numerics=engine.numerics)


def bits(a) -> np.ndarray:
    return np.asarray(a, np.float32).view(np.uint32)


@pytest.fixture(scope="module")
def batched(model):
    """All three together (siblings share the prefix page), pages of 16, 32-token steps."""
    outs, engine = generate(model, PROMPTS, PARAMS, max_num_seqs=4, max_num_batched_tokens=32)
    return outs, engine


def test_rollout_is_bitwise_score(model, batched, capfd):
    outs, engine = batched
    scored = score(engine, model, PROMPTS, [o.token_ids for o in outs], PARAMS)
    for out, values in zip(outs, scored, strict=True):
        assert len(out.token_ids) == 3 and np.all(np.isfinite(out.logprobs))
        assert np.array_equal(bits(values), bits(out.logprobs))
    assert engine.stats["prefix_cache_hit_tokens"] >= 16  # the sibling read the shared page
    out, err = capfd.readouterr()
    assert "RACE DETECTED" not in out + err


def test_outputs_independent_of_batch_page_size_and_prefix_cache(model, batched, capfd):
    """One at a time, pages of 32 (the shared prefix no longer fills a page), no prefix cache."""
    alone, _ = generate(
        model,
        PROMPTS,
        PARAMS,
        max_num_seqs=1,
        max_num_batched_tokens=16,
        page_size=32,
        enable_prefix_caching=False,
    )
    for a, b in zip(alone, batched[0], strict=True):
        assert a.token_ids == b.token_ids
        assert np.array_equal(bits(a.logprobs), bits(b.logprobs))
    out, err = capfd.readouterr()
    assert "RACE DETECTED" not in out + err
