"""Batch-invariant log-softmax over the vocabulary: the fixed-tile CPU lowering and the Pallas
kernel (HLO and TPU interpret modes, compiled on a GPU/TPU machine), all reached through `ops`;
rows carry -inf masks as after top-k/min-p."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import Numerics, log_softmax, ops, pallas_log_softmax
from tests.pallas_kernels.checks import (
    BACKENDS,
    TPU_INTERPRET_2_CORES,
    assert_bitwise,
    assert_close,
    assert_no_races,
    kernel_calls,
    lower_for,
)


def _logits(rng, rows: int, vocab: int, dtype) -> jax.Array:
    """Logits with masked (-inf) entries: a random third in every other row, and one row with a
    single finite entry."""
    z = rng.standard_normal((rows, vocab), np.float32) * 4.0
    z[::2][rng.random((len(z[::2]), vocab)) < 0.3] = -np.inf
    z[1, 1:] = -np.inf
    return jnp.asarray(z, dtype)


@functools.cache
def _jitted(backend: str):
    return jax.jit(lambda z: ops.log_softmax(z, Numerics(backend=backend)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("vocab", [1000, 4096])  # 1000: the last vocab tile is shifted
def test_matches_reference(vocab, dtype, backend):
    z = _logits(np.random.default_rng(0), 37, vocab, dtype)
    out = _jitted(backend)(z)
    assert out.dtype == jnp.float32
    assert_close(out, log_softmax.reference(z), jnp.float32)  # fp32 math on either input


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_is_bitwise_invariant_to_batch_and_position(backend):
    rng = np.random.default_rng(1)
    z = _logits(rng, 70, 1000, jnp.float32)
    probe = _logits(rng, 2, 1000, jnp.float32)[:1]  # a row with a masked third
    op = _jitted(backend)
    alone = op(probe)[0]
    for rows, at in [(7, 3), (8, 7), (33, 32), (70, 45)]:
        assert_bitwise(op(z[:rows].at[at].set(probe[0]))[at], alone)


def test_tpu_kernel_on_two_cores(capfd):
    """Two simulated TensorCores share the grid (shuffled): same bits as one, and no races."""
    z = _logits(np.random.default_rng(3), 40, 1000, jnp.bfloat16)
    two = jax.jit(lambda z: pallas_log_softmax.kernel(z, interpret=TPU_INTERPRET_2_CORES))
    assert_bitwise(two(z), _jitted("tpu_interpret")(z))
    assert_no_races(capfd)


def test_gradient_is_the_reference_gradient():
    rng = np.random.default_rng(2)
    z = jnp.asarray(rng.standard_normal((9, 300), np.float32))
    cotangent = jnp.asarray(rng.standard_normal((9, 300), np.float32))

    def loss(fn):
        return lambda z: jnp.sum(fn(z) * cotangent)

    got = jax.jit(jax.grad(loss(lambda z: ops.log_softmax(z, Numerics(backend="cpu")))))(z)
    assert_close(got, jax.jit(jax.grad(loss(log_softmax.reference)))(z), jnp.float32)


@pytest.mark.parametrize(
    "platform,target", [("cuda", "xla.gpu.triton"), ("tpu", "tpu_custom_call")]
)
def test_kernel_lowers_for_gpu_and_tpu(platform, target):
    z = jnp.zeros((40, 49157), jnp.float32)  # a partial last vocab tile
    mlir = lower_for(platform, pallas_log_softmax.kernel, z)
    assert target in mlir and kernel_calls(mlir)["mosaic_gpu"] == 0
