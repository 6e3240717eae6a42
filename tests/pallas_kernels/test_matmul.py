"""Batch-invariant matmul and lm_head: the fixed-tile CPU lowering and the Pallas kernel
(interpret mode), both reached through `ops` as the model reaches them."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import Numerics, matmul, ops, pallas_matmul
from tests.pallas_kernels.checks import assert_bitwise, assert_close, lower_for

HIDDEN, OUT, VOCAB = 128, 192, 1000  # OUT and VOCAB leave a partial last column block
BACKENDS = ("cpu", "pallas_interpret")
OPS = {"matmul": (ops.matmul, matmul.reference), "lm_head": (ops.lm_head, matmul.reference_nt)}


def _weight_shape(name: str) -> tuple[int, int]:
    return (HIDDEN, OUT) if name == "matmul" else (VOCAB, HIDDEN)


def _normal(rng, shape, dtype) -> jax.Array:
    return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)


@functools.cache
def _jitted(name: str, backend: str):
    op = OPS[name][0]
    return jax.jit(lambda x, w: op(x, w, Numerics(backend=backend)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "x_dtype,w_dtype",
    [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.bfloat16), (jnp.float32, jnp.bfloat16)],
)
@pytest.mark.parametrize("name", OPS)
def test_matches_reference(name, x_dtype, w_dtype, backend):
    rng = np.random.default_rng(0)
    x = _normal(rng, (37, HIDDEN), x_dtype)  # 37 rows: a whole row tile and a ragged one
    w = _normal(rng, _weight_shape(name), w_dtype)
    out = _jitted(name, backend)(x, w)
    assert out.dtype == jnp.float32
    # bf16 products are exact in fp32 and both accumulate in fp32: fp32 tolerance throughout
    assert_close(out, OPS[name][1](x, w), jnp.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", OPS)
def test_row_is_bitwise_invariant_to_batch_and_position(name, backend):
    rng = np.random.default_rng(1)
    x_dtype = jnp.bfloat16 if name == "matmul" else jnp.float32  # lm_head runs on fp32 hidden
    x = _normal(rng, (256, HIDDEN), x_dtype)
    w = _normal(rng, _weight_shape(name), jnp.bfloat16)
    probe = _normal(rng, (1, HIDDEN), x_dtype)
    op = _jitted(name, backend)
    alone = op(probe, w)[0]
    # batch sizes around the 32-row tile, the probe first/last/mid-tile; 256 rows is where XLA's
    # own dot re-blocks on CPU
    for rows, at in [(7, 3), (32, 31), (33, 32), (40, 37), (256, 0), (256, 200)]:
        batch = x[:rows].at[at].set(probe[0])
        assert_bitwise(op(batch, w)[at], alone)


@pytest.mark.parametrize("name", OPS)
def test_gradient_is_the_reference_gradient(name):
    rng = np.random.default_rng(2)
    x = _normal(rng, (9, HIDDEN), jnp.float32)
    w = _normal(rng, _weight_shape(name), jnp.float32)
    cotangent = _normal(rng, (9, _weight_shape(name)[1 if name == "matmul" else 0]), jnp.float32)
    op, reference = OPS[name]

    def loss(fn):
        return lambda x, w: jnp.sum(fn(x, w) * cotangent)

    got = jax.jit(jax.grad(loss(lambda x, w: op(x, w, Numerics(backend="cpu"))), (0, 1)))(x, w)
    want = jax.jit(jax.grad(loss(reference), (0, 1)))(x, w)
    for g, e in zip(got, want, strict=True):
        assert_close(g, e, jnp.float32)


def test_kernel_rejects_mismatched_contraction():
    with pytest.raises(ValueError, match="contracted axis"):
        pallas_matmul.kernel(jnp.zeros((4, 64)), jnp.zeros((32, 64)), interpret=True)


@pytest.mark.parametrize(
    "platform,target", [("cuda", "xla.gpu.triton"), ("tpu", "tpu_custom_call")]
)
def test_kernels_lower_for_gpu_and_tpu(platform, target):
    x = jnp.zeros((40, 576), jnp.float32)  # SmolLM2 shapes; 49157 leaves a partial vocab block
    assert target in lower_for(
        platform, pallas_matmul.kernel, x.astype(jnp.bfloat16), jnp.zeros((576, 1536), jnp.bfloat16)
    )
    assert target in lower_for(
        platform, pallas_matmul.kernel_nt, x, jnp.zeros((49157, 576), jnp.bfloat16)
    )
