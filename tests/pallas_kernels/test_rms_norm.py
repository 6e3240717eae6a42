"""Batch-invariant RMSNorm: the fixed-tile CPU lowering and the Pallas kernel (HLO and TPU
interpret modes, compiled on a GPU/TPU machine), all reached through `ops`, for hidden states
[M, H] and per-head q/k norms [M, heads, D]."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jengine.config import Numerics
from pallas_kernels import ops, pallas_rms_norm, rms_norm
from tests.pallas_kernels.checks import (
    BACKENDS,
    TPU_INTERPRET_2_CORES,
    assert_bitwise,
    assert_close,
    assert_no_races,
    kernel_calls,
    lower_for,
)

EPS = 1e-6
SHAPES = {"hidden": (576,), "per_head": (3, 64)}  # 576 = SmolLM2's hidden: 9 chunks of 64


def _normal(rng, shape, dtype) -> jax.Array:
    return jnp.asarray(rng.standard_normal(shape, np.float32) * 3.0, dtype)


@functools.cache
def _jitted(backend: str):
    return jax.jit(lambda x, w: ops.rms_norm(x, w, EPS, Numerics(backend=backend)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, dtype, backend):
    rng = np.random.default_rng(0)
    x = _normal(rng, (37, *SHAPES[shape]), dtype)
    w = _normal(rng, SHAPES[shape][-1:], dtype)
    out = _jitted(backend)(x, w)
    assert out.dtype == dtype
    assert_close(out, rms_norm.reference(x, w, EPS), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_row_is_bitwise_invariant_to_batch_and_position(shape, backend):
    rng = np.random.default_rng(1)
    x = _normal(rng, (70, *SHAPES[shape]), jnp.bfloat16)
    w = _normal(rng, SHAPES[shape][-1:], jnp.bfloat16)
    probe = _normal(rng, (1, *SHAPES[shape]), jnp.bfloat16)
    op = _jitted(backend)
    alone = op(probe, w)[0]
    for rows, at in [(7, 3), (16, 15), (33, 32), (70, 45)]:
        batch = x[:rows].at[at].set(probe[0])
        assert_bitwise(op(batch, w)[at], alone)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_gradient_matches_torch_autograd(shape, backend):
    """The op's gradient (a custom_vjp) against torch autograd in float64 through
    `w * x * rsqrt(mean(x^2) + eps)` written here: an independent reference, so a wrong
    backward (scaled, or the gradient of another function) fails."""
    rng = np.random.default_rng(2)
    dims = SHAPES[shape]
    x, w, c = (_normal(rng, s, jnp.float32) for s in [(9, *dims), dims[-1:], (9, *dims)])
    numerics = Numerics(backend=backend)
    loss = lambda x, w: jnp.sum(ops.rms_norm(x, w, EPS, numerics) * c)  # noqa: E731
    dx, dw = jax.jit(jax.grad(loss, (0, 1)))(x, w)
    tx, tw = (torch.tensor(np.asarray(a), dtype=torch.float64, requires_grad=True) for a in (x, w))
    y = tw * tx * torch.rsqrt(torch.mean(tx * tx, dim=-1, keepdim=True) + EPS)
    (y * torch.tensor(np.asarray(c), dtype=torch.float64)).sum().backward()
    assert_close(dx, tx.grad.numpy(), jnp.float32)
    assert_close(dw, tw.grad.numpy(), jnp.float32)


def test_tpu_kernel_on_two_cores(capfd):
    """Two simulated TensorCores share the grid (shuffled): same bits as one, and no races."""
    rng = np.random.default_rng(3)
    x, w = _normal(rng, (70, 576), jnp.bfloat16), _normal(rng, (576,), jnp.bfloat16)
    two = jax.jit(lambda x, w: pallas_rms_norm.kernel(x, w, EPS, interpret=TPU_INTERPRET_2_CORES))
    assert_bitwise(two(x, w), _jitted("tpu_interpret")(x, w))
    assert_no_races(capfd)


def test_kernel_rejects_mismatched_weight():
    with pytest.raises(ValueError, match="last axis"):
        pallas_rms_norm.kernel(jnp.zeros((4, 64)), jnp.zeros((32,)), EPS, interpret=True)


@pytest.mark.parametrize(
    "platform,target", [("cuda", "xla.gpu.triton"), ("tpu", "tpu_custom_call")]
)
def test_kernel_lowers_for_gpu_and_tpu(platform, target):
    norm = functools.partial(pallas_rms_norm.kernel, eps=EPS)
    x, w = jnp.zeros((40, 576), jnp.bfloat16), jnp.zeros((576,), jnp.bfloat16)
    for args in [(x, w), (x.reshape(40, 9, 64), w[:64])]:
        mlir = lower_for(platform, norm, *args)
        assert target in mlir and kernel_calls(mlir)["mosaic_gpu"] == 0


@pytest.mark.parametrize("heads,head_dim,hidden", [(1, 256, 640), (4, 256, 640), (2, 64, 64)])
def test_per_head_norm_after_a_projection_is_invariant_to_the_bucket(heads, head_dim, hidden):
    """A q/k-norm as the model runs it, fused behind its projection in one program: a token's
    bits are the same in a 16-row and a 32-row program (Gemma 3 270M's single KV head,
    [M, 1, 256], once gave other bits at 32 rows than at 16)."""
    rng = np.random.default_rng(3)
    num = Numerics(backend="cpu")
    table = _normal(rng, (64, hidden), jnp.float32)
    proj = _normal(rng, (heads * head_dim, hidden), jnp.float32) * 0.02
    w = _normal(rng, (head_dim,), jnp.float32)

    @jax.jit
    def qk_norm(tokens):
        x = ops.matmul(table[tokens], proj, num).reshape(tokens.shape[0], heads, head_dim)
        return ops.rms_norm(x, w, EPS, num)

    tokens = jnp.asarray(rng.integers(0, 64, 32), jnp.int32)
    full = qk_norm(tokens)
    for row in range(26):
        alone = qk_norm(jnp.zeros((16,), jnp.int32).at[0].set(tokens[row]))
        assert_bitwise(alone[0], full[row])
