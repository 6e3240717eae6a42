"""The decoder layers run under one `lax.scan`: a step traces one period of layers whatever the
depth, the stacked params convert to and from per-layer lists, and per-layer trees are refused
with the way to convert them."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jengine import Engine, EngineConfig
from jengine.config import ModelConfig, Numerics
from jengine.models.transformer import (Model, ScratchKV, forward, init_params, layer_period,
                                        stack_layers, unstack_layers)  # fmt: skip
from jengine.rl.logprobs import dense_plan

TINY = ModelConfig.named("tiny")
GEMMA = ModelConfig.named("tiny-gemma3")


def _gemma(num_layers: int, pattern: int) -> ModelConfig:
    types = tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                  for i in range(num_layers))  # fmt: skip
    return GEMMA.replace(num_layers=num_layers, layer_types=types)


def _equations(config: ModelConfig) -> int:
    """Equations in the traced step's jaxpr, scan bodies included."""
    plan, num_pages = dense_plan(2, 24, 16)
    plan = jax.tree_util.tree_map(jnp.asarray, plan)
    params = jax.eval_shape(lambda: init_params(config))
    numerics = Numerics().resolved()
    jaxpr = jax.make_jaxpr(lambda p: forward(p, config, plan, ScratchKV(num_pages, 16), numerics)[0])
    closed = jaxpr(params)

    def count(j) -> int:
        return sum(1 + sum(count(sub.jaxpr if hasattr(sub, "jaxpr") else sub)
                           for sub in jax.extend.core.jaxprs_in_params(e.params)) for e in j.eqns)  # fmt: skip

    return count(closed.jaxpr)


@pytest.mark.parametrize("config, period", [
    (TINY, 1), (GEMMA, 2), (_gemma(18, 6), 6), (_gemma(26, 6), 6), (_gemma(8, 2), 2),
])  # fmt: skip
def test_layer_period(config, period):
    assert layer_period(config) == period


def test_a_step_traces_one_period_whatever_the_depth():
    assert _equations(TINY.replace(num_layers=2)) == _equations(TINY.replace(num_layers=12))
    # Gemma 3's five sliding layers and one full one: one period traced, 1 or 5 periods run
    assert _equations(_gemma(6, 6)) == _equations(_gemma(30, 6))
    # layers left over after the last whole period are traced once each
    assert _equations(_gemma(8, 6)) > _equations(_gemma(6, 6))


def test_stack_and_unstack_layers_round_trip():
    params = init_params(TINY)
    per_layer = unstack_layers(params)
    assert len(per_layer["layers"]) == TINY.num_layers
    assert per_layer["layers"][1]["wq"].shape == params["layers"]["wq"].shape[1:]
    np.testing.assert_array_equal(per_layer["layers"][1]["wq"], params["layers"]["wq"][1])
    again = stack_layers(per_layer)
    for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_per_layer_params_are_refused_with_the_conversion():
    model = Model(TINY, unstack_layers(init_params(TINY)))
    with pytest.raises(ValueError, match="stack_layers"):
        Engine(model, EngineConfig(max_model_len=64, num_pages=8))


def test_the_step_copies_no_stacked_weight():
    """The engine's compiled step reads each layer's weights out of the stacks in place: its
    temporaries stay below half the layers' weights. (Viewing a stack as [periods, 1, ...] made XLA
    copy every stacked weight on every step: temporaries above the weights' size.)"""
    from jengine.runner import model_step
    from tests.test_export import step_for_bucket

    config = TINY.replace(num_layers=8, hidden_size=256, intermediate_size=2048, dtype="float32")
    fn, args, static = step_for_bucket(config, EngineConfig(max_model_len=64, max_num_seqs=4), 16, 0)
    static["numerics"] = Numerics().resolved()  # this machine's lowering
    assert fn is model_step
    compiled = fn.lower(*args, **static).compile()
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(args[0]["layers"]))
    assert weights > 30e6
    assert compiled.memory_analysis().temp_size_in_bytes < weights / 2
