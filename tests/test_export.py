"""Whole-step exports at real shapes: the engine's jitted step for every bucket (prefill and decode
share it) exports with `jax.export` for `tpu` and for `cuda` from this CPU machine, from abstract
shapes (no weights), and lowers every kernel to Mosaic TPU resp. Triton (none to Mosaic GPU).

Every layer of a model has the same shapes, so the bucket sweep exports 2-layer versions of the
real configs; the full layer count is exported for the largest bucket. Qwen3-30B-A3B's
mixture-of-experts step exports at 2 layers.
"""

from __future__ import annotations

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax._src.pallas.mosaic import tpu_info

from jengine import EngineConfig, ModelConfig
from jengine.models.transformer import layer_period

# Gemma-3-270M joins when its config ships ("gemma3-270m"); until then it is skipped.
MODELS = ("qwen3-0.6b", "llama-3.2-1b", "gemma3-270m")
TARGET = {"cuda": "@__gpu$xla.gpu.triton(", "tpu": "@tpu_custom_call("}
OTHERS = {
    "cuda": ("@tpu_custom_call(", "mosaic_gpu"),
    "tpu": ("@__gpu$xla.gpu.triton(", "mosaic_gpu"),
}


def buckets(config: EngineConfig) -> list[tuple[int, int]]:
    """(token bucket, top_n) pairs an engine with `config` compiles (`runner.Runner`'s table)."""
    from jengine.runner import MAX_TOP_N, MIN_TOKEN_BUCKET

    tokens = [MIN_TOKEN_BUCKET]
    while tokens[-1] < config.max_num_batched_tokens:
        tokens.append(2 * tokens[-1])
    return [(t, n) for t in tokens for n in (0, MAX_TOP_N)]


def step_for_bucket(
    model: ModelConfig, config: EngineConfig, num_tokens: int, top_n: int, mode: str = "invariant"
):
    """(jitted step, abstract positional args, static kwargs) of the engine's step for one bucket
    (`runner.model_step` over an all-padding `StepPlan`), with `kernel_backend="pallas"`."""
    from jengine import plan
    from jengine.config import Numerics
    from jengine.models.transformer import param_shapes
    from jengine.runner import model_step, next_pow2

    num_seqs = min(num_tokens, next_pow2(config.max_num_seqs))
    pages_per_seq = -(-(config.max_model_len or model.max_position_embeddings) // config.page_size)
    num_pages = config.max_num_seqs * pages_per_seq
    empty = plan.build([], config.page_size, pages_per_seq)
    step = empty.padded(num_tokens, num_seqs, num_seqs, num_pages * config.page_size)
    dtype = jnp.dtype(model.dtype)
    shaped = lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)  # noqa: E731
    params = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s, dtype),
        param_shapes(model),
        is_leaf=lambda x: isinstance(x, tuple),
    )
    pages = jax.ShapeDtypeStruct(
        (model.num_layers, num_pages, config.page_size, model.num_kv_heads, model.head_dim), dtype
    )
    kv = (pages, pages)
    args = (params, kv, jax.tree_util.tree_map(shaped, step))
    numerics = Numerics(mode=mode, backend="pallas", lm_head_dtype=config.lm_head_dtype)
    static = dict(config=model, numerics=numerics, logprobs_mode=config.logprobs_mode, top_n=top_n)
    return model_step, args, static


def export_text(platform: str, fn, args, static) -> str:
    """StableHLO of `fn(*args, **static)` exported for `platform` (Mosaic's device kind mocked)."""
    with (
        mock.patch.object(tpu_info, "get_device_kind", lambda: "TPU v5e"),
        mock.patch.object(tpu_info, "get_num_device_cores", lambda: 1),
    ):
        triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
        exported = export.export(fn, platforms=[platform], disabled_checks=[triton])
        return exported(*args, **static).mlir_module()


def _model(name: str, num_layers: int | None = None) -> ModelConfig:
    """The shipped config, or its first layers of each kind (sliding and full) when cut short."""
    config = ModelConfig.named(name)
    if num_layers is None:
        return config
    types = config.layer_types
    kinds = tuple(dict.fromkeys(types)) if types else None  # one layer of each kind present
    num_layers = max(num_layers, len(kinds or ()))
    return config.replace(num_layers=num_layers, layer_types=kinds and (kinds * num_layers)[:num_layers])


def _check(platform: str, text: str) -> None:
    assert text.count(TARGET[platform]) > 0
    for other in OTHERS[platform]:
        assert other not in text, f"{other} in a {platform} export"


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("name", MODELS)
def test_every_bucket_exports(name, platform):
    model, config = _model(name, num_layers=2), EngineConfig(max_model_len=4096)
    for num_tokens, top_n in buckets(config):
        _check(platform, export_text(platform, *step_for_bucket(model, config, num_tokens, top_n)))
    largest = buckets(config)[-1][0]
    _check(platform, export_text(platform, *step_for_bucket(model, config, largest, 0, "fast")))


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("name", MODELS)
def test_largest_bucket_exports_at_full_depth(name, platform):
    model, config = _model(name), EngineConfig()
    largest = buckets(config)[-1][0]
    text = export_text(platform, *step_for_bucket(model, config, largest, 0))
    _check(platform, text)
    per_layer = 10 + 2 * model.qk_norm + 2 * model.post_norms  # 2 norms, 7 matmuls, attention
    # (+ q/k norms, + Gemma's post-attention and post-MLP norms)
    # the layers run under one scan: its body (one period of layer kinds) holds each kernel once
    # per layer of the period, the leftover layers are unrolled after it
    period = layer_period(model)
    traced_layers = period + model.num_layers % period
    assert model.num_layers // period > 1 and "stablehlo.while" in text
    assert text.count(TARGET[platform]) == traced_layers * per_layer + 2  # final norm, lm_head
    assert f"tensor<{model.num_layers}x{model.hidden_size}x" in text  # stacked layer weights


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_moe_step_exports_at_qwen3_30b_a3b_shape(platform):
    """Qwen3-30B-A3B's step (2 of its 48 layers: 128 experts of 768, top 8) exports for the
    smallest and largest buckets, invariant and fast; the invariant step lowers the router and
    the expert kernel (three grouped matmuls per sparse layer) to the platform's kernels."""
    model, config = _model("qwen3-30b-a3b", num_layers=2), EngineConfig(max_model_len=4096)
    dense = _model("qwen3-0.6b", num_layers=2)
    counts = {}
    for name, m in (("moe", model), ("dense", dense)):
        counts[name] = export_text(platform, *step_for_bucket(m, config, 16, 0)).count(TARGET[platform])
    # the scan body (one layer) holds the kernels once: its dense MLP's 3 matmuls become the
    # router's matmul and the experts' 3 grouped matmuls
    assert counts["moe"] == counts["dense"] + 1, counts
    largest = buckets(config)[-1][0]
    _check(platform, export_text(platform, *step_for_bucket(model, config, largest, 0)))
    _check(platform, export_text(platform, *step_for_bucket(model, config, largest, 0, "fast")))
