"""Batch-invariant matmul `x @ w^T` for a layer weight and for the lm_head (one op, two shapes):
the fixed-tile CPU lowering and the Pallas kernel (HLO and TPU interpret modes, compiled on a
GPU/TPU machine), all reached through `ops` as the model reaches them."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jengine.config import Numerics
from pallas_kernels import matmul, ops, pallas_matmul
from tests.pallas_kernels.checks import (
    BACKENDS,
    TPU_INTERPRET_2_CORES,
    assert_bitwise,
    assert_close,
    assert_no_races,
    kernel_calls,
    lower_for,
)

HIDDEN, OUT, VOCAB = 128, 192, 1000  # OUT and VOCAB leave a partial last column block
WEIGHT_SHAPES = {"layer": (OUT, HIDDEN), "lm_head": (VOCAB, HIDDEN)}  # [out, in]


def _normal(rng, shape, dtype) -> jax.Array:
    return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)


@functools.cache
def _jitted(backend: str):
    return jax.jit(lambda x, w: ops.matmul(x, w, Numerics(backend=backend)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "x_dtype,w_dtype",
    [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.bfloat16), (jnp.float32, jnp.bfloat16)],
)
@pytest.mark.parametrize("name", WEIGHT_SHAPES)
def test_matches_reference(name, x_dtype, w_dtype, backend):
    rng = np.random.default_rng(0)
    x = _normal(rng, (37, HIDDEN), x_dtype)  # 37 rows: a whole row tile and a ragged one
    w = _normal(rng, WEIGHT_SHAPES[name], w_dtype)
    out = _jitted(backend)(x, w)
    assert out.dtype == jnp.float32 and out.shape == (37, WEIGHT_SHAPES[name][0])
    # bf16 products are exact in fp32 and both accumulate in fp32: fp32 tolerance throughout
    assert_close(out, matmul.reference(x, w), jnp.float32)
    # and the reference is x @ w^T, computed by numpy in float64
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", WEIGHT_SHAPES)
def test_row_is_bitwise_invariant_to_batch_and_position(name, backend):
    rng = np.random.default_rng(1)
    x_dtype = jnp.bfloat16 if name == "layer" else jnp.float32  # lm_head runs on fp32 hidden
    x = _normal(rng, (256, HIDDEN), x_dtype)
    w = _normal(rng, WEIGHT_SHAPES[name], jnp.bfloat16)
    probe = _normal(rng, (1, HIDDEN), x_dtype)
    op = _jitted(backend)
    alone = op(probe, w)[0]
    # batch sizes around the 32-row tile, the probe first/last/mid-tile; 256 rows is where XLA's
    # own dot re-blocks on CPU
    for rows, at in [(7, 3), (32, 31), (33, 32), (40, 37), (256, 0), (256, 200)]:
        batch = x[:rows].at[at].set(probe[0])
        assert_bitwise(op(batch, w)[at], alone)


GRAD_NUMERICS = [
    Numerics(backend="cpu"),
    Numerics(backend="cpu", column_blocks=2),
    Numerics(backend="pallas_interpret"),
]


@pytest.mark.parametrize("numerics", GRAD_NUMERICS, ids=lambda n: f"{n.backend}-C{n.column_blocks}")
@pytest.mark.parametrize("name", WEIGHT_SHAPES)
def test_gradient_matches_the_analytic_gradient(name, numerics):
    """The op's gradient (a custom_vjp) against the closed form, in float64 numpy: for
    loss = sum(c * (x @ w^T)), d/dx = c @ w and d/dw = c^T @ x. A backward that is wrong (scaled,
    transposed, the wrong operand) fails here, whatever the reference kernel says."""
    rng = np.random.default_rng(2)
    x = _normal(rng, (9, HIDDEN), jnp.float32)
    w = _normal(rng, WEIGHT_SHAPES[name], jnp.float32)
    c = _normal(rng, (9, WEIGHT_SHAPES[name][0]), jnp.float32)
    loss = lambda x, w: jnp.sum(ops.matmul(x, w, numerics) * c)  # noqa: E731
    dx, dw = jax.jit(jax.grad(loss, (0, 1)))(x, w)
    x64, w64, c64 = (np.asarray(a, np.float64) for a in (x, w, c))
    assert_close(dx, c64 @ w64, jnp.float32)
    assert_close(dw, c64.T @ x64, jnp.float32)


def test_tpu_kernel_on_two_cores(capfd):
    """Two simulated TensorCores share the grid (shuffled): same bits as one, and no races."""
    rng = np.random.default_rng(3)
    x = _normal(rng, (70, HIDDEN), jnp.bfloat16)
    w = _normal(rng, WEIGHT_SHAPES["lm_head"], jnp.bfloat16)
    two = jax.jit(functools.partial(pallas_matmul.kernel, interpret=TPU_INTERPRET_2_CORES))(x, w)
    assert_bitwise(two, _jitted("tpu_interpret")(x, w))
    assert_no_races(capfd)


def test_kernel_rejects_mismatched_contraction():
    with pytest.raises(ValueError, match="contracted axis"):
        pallas_matmul.kernel(jnp.zeros((4, 64)), jnp.zeros((64, 32)), interpret=True)


@pytest.mark.parametrize(
    "platform,target", [("cuda", "xla.gpu.triton"), ("tpu", "tpu_custom_call")]
)
def test_kernels_lower_for_gpu_and_tpu(platform, target):
    x = jnp.zeros((40, 576), jnp.float32)  # SmolLM2 shapes; 49157 leaves a partial vocab block
    for args in [(x.astype(jnp.bfloat16), jnp.zeros((1536, 576), jnp.bfloat16)),
                 (x, jnp.zeros((49157, 576), jnp.bfloat16))]:
        mlir = lower_for(platform, pallas_matmul.kernel, *args)
        assert target in mlir and kernel_calls(mlir)["mosaic_gpu"] == 0


# Every tile size in use: a batch under ROW_TILE rows runs one tile of 2, 4 or 8 rows where that
# tile gives the ROW_TILE tile's bits on this machine (checked per weight shape), else the
# ROW_TILE tile; more rows run ROW_TILE tiles. Row counts around each tile size, batch 1 included.
SMALL_BATCHES = [(1, 0), (2, 1), (3, 2), (4, 0), (5, 4), (8, 7), (9, 3), (15, 14), (16, 0), (17, 16)]


@pytest.mark.parametrize(
    "shape,x_dtype,w_dtype",
    [
        ((576, 576), jnp.float32, jnp.float32),  # SmolLM2-135M q/o
        ((1536, 576), jnp.bfloat16, jnp.bfloat16),  # SmolLM2 gate/up in bf16
        ((576, 1536), jnp.float32, jnp.float32),  # SmolLM2 down
        ((49152, 576), jnp.float32, jnp.float32),  # SmolLM2 fp32 lm_head
        ((896, 4864), jnp.float32, jnp.float32),  # Qwen2.5-0.5B down: K > 2048
    ],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else jnp.dtype(v).name,
)
def test_every_tile_size_gives_the_row_tile_bits(shape, x_dtype, w_dtype):
    """A row's bits are those of the row alone in a ROW_TILE tile, whatever the batch's tile."""
    rng = np.random.default_rng(4)
    w = _normal(rng, shape, w_dtype) * 0.05
    x = _normal(rng, (matmul.ROW_TILE + 1, shape[1]), x_dtype)
    probe = _normal(rng, (1, shape[1]), x_dtype)
    op = _jitted("cpu")
    alone = np.asarray(op(x[: matmul.ROW_TILE].at[0].set(probe[0]), w))[0]
    for rows, at in SMALL_BATCHES:
        assert_bitwise(op(x[:rows].at[at].set(probe[0]), w)[at], jnp.asarray(alone))


def test_small_tiles_only_where_they_give_the_row_tile_bits(monkeypatch):
    """`small_tile` uses a smaller tile only when the check finds every row's bits equal to the
    ROW_TILE tile's: a dot whose bits depend on its tile rows sends every batch to ROW_TILE."""
    x, w = jnp.zeros((3, 64), jnp.float32), jnp.zeros((32, 64), jnp.float32)
    real = matmul.weight_first
    tile_dependent = lambda t, *ws: real(t, *ws) + t.shape[0] * 1e-3  # noqa: E731
    matmul.small_tiles_agree.cache_clear()
    try:
        monkeypatch.setattr(matmul, "weight_first", tile_dependent)
        assert [matmul.small_tile(r, x, w) for r in (1, 3, 8, 16, 40)] == [matmul.ROW_TILE] * 5
        monkeypatch.setattr(matmul, "weight_first", lambda t, *ws: real(t, *ws) * 0 + 1)
        matmul.small_tiles_agree.cache_clear()
        assert [matmul.small_tile(r, x, w) for r in (1, 3, 8, 16, 40)] == [2, 4, 8, 16, 16]
    finally:
        matmul.small_tiles_agree.cache_clear()
