"""Batch-invariant Pallas matmul: `kernel(x, w)` = x[M, K] @ w[N, K]^T, the layout of every weight
(layers and lm_head alike, see `matmul`). Same values as `matmul.reference`.

Blocks, chosen from (K, N) only, never from the row count M:
  * rows: BLOCK_M; x is zero-padded to a multiple of it (padded rows are dropped);
  * contraction: bk = the largest power of two <= BLOCK_K dividing K;
  * columns: bn = BLOCK_N, or the largest power of two <= N when N is smaller.
Each program owns one [BLOCK_M, bn] output block and accumulates, in fp32 and in K order,
`acc += dot(x[:, kblock], w[cols, kblock]^T)`. A row's value is that fixed sequence of fixed-shape
dots over its own inputs, so it does not depend on M or on where the row sits.

Columns past the last whole block: the last column block is shifted left to end at N (an
element-offset `pl.Element` block), so it reads only real weight rows and each column is still
always computed at the same offset of the same block. The output is laid out in whole blocks
and the shifted block's new columns are cut out afterwards: no copy of a 150k-row weight per call,
one copy of the [M, N] output when bn does not divide N.

See `pallas_common` for the lowering (Triton on GPU, Mosaic on TPU, interpreter on CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.pallas_common import Interpret, floor_pow2, pallas_call, pow2_block
from pallas_kernels.tiling import pad_rows

BLOCK_M = 32
BLOCK_N = 256
BLOCK_K = 512
_MIN_BLOCK = 16  # smallest dot dimension Triton accepts


def kernel(x: jax.Array, w: jax.Array, *, interpret: Interpret = False) -> jax.Array:
    """f32[M, N] = x[M, K] @ w[N, K]^T with fp32 accumulation."""
    rows, k = x.shape
    n, w_k = w.shape
    if w_k != k:
        raise ValueError(f"x{x.shape} and w{w.shape} disagree on the contracted axis")
    bk = check_blocks(k, n)
    bn, num_n = column_blocking(n)
    w_spec = pl.BlockSpec((pl.Element(bn), pl.Element(k)), lambda j, i: (first_column(j, n, bn), 0))
    xp = pad_rows(x, BLOCK_M)
    out = pallas_call(
        functools.partial(_block_kernel, bk=bk),
        grid=(num_n, xp.shape[0] // BLOCK_M),  # a column block stays put while rows stream
        in_specs=[pl.BlockSpec((BLOCK_M, k), lambda j, i: (i, 0)), w_spec],
        out_specs=pl.BlockSpec((BLOCK_M, bn), lambda j, i: (i, j)),
        out_shape=jax.ShapeDtypeStruct((xp.shape[0], num_n * bn), jnp.float32),
        interpret=interpret,
        name="matmul",
    )(xp, w)[:rows]
    return drop_shifted_columns(out, n)


def column_blocking(n: int) -> tuple[int, int]:
    """(bn, number of column blocks) for N output columns: bn = BLOCK_N, or the largest power of
    two <= N when N is smaller."""
    bn = min(BLOCK_N, floor_pow2(n))
    return bn, pl.cdiv(n, bn)


def first_column(j: jax.Array, n: int, bn: int) -> jax.Array:
    """First column of column block j; the last block is shifted left to end at n."""
    return jnp.minimum(j * bn, n - bn)


def drop_shifted_columns(out: jax.Array, n: int) -> jax.Array:
    """f32[M, n] from an output laid out in whole column blocks (`column_blocking`): the last block
    holds columns n-bn..n-1; keep the ones no whole block covers."""
    bn, num_n = column_blocking(n)
    rem = n % bn
    if not rem:
        return out
    return jnp.concatenate([out[:, : n - rem], out[:, num_n * bn - rem :]], axis=1)


def check_blocks(k: int, n: int) -> int:
    """The contraction block bk for K = k; raises unless k and n suit the kernel's blocks."""
    bk = pow2_block(k, BLOCK_K)
    if bk < _MIN_BLOCK or n < _MIN_BLOCK:
        raise ValueError(f"{k=} must be a multiple of {_MIN_BLOCK} and {n=} at least {_MIN_BLOCK}")
    return bk


def _block_kernel(x_ref, w_ref, o_ref, *, bk: int) -> None:
    """o[BLOCK_M, bn] = sum over K blocks, in order, of dot(x[:, kb], w[:, kb]^T) in fp32."""
    o_ref[...] = k_blocked_dot(
        lambda ks: x_ref[:, ks], lambda ks: w_ref[:, ks], x_ref.shape[1], bk, o_ref.shape
    )


def k_blocked_dot(load_x, load_w, k: int, bk: int, shape: tuple[int, int]) -> jax.Array:
    """f32[shape] = sum over the K / bk contraction blocks, in order, of
    `block_dot(load_x(kb), load_w(kb))` (`load_*` take a `pl.ds` of K and return [rows, bk] /
    [cols, bk]), starting from zeros."""

    def step(kb, acc):
        ks = pl.ds(pl.multiple_of(kb * bk, bk), bk)
        return acc + block_dot(load_x(ks), load_w(ks))

    return jax.lax.fori_loop(0, k // bk, step, jnp.zeros(shape, jnp.float32))


def block_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """f32[rows, cols] = x[rows, bk] @ w[cols, bk]^T, fp32 accumulation; mixed dtypes (fp32 hidden
    x bf16 weight) are upcast here."""
    dtype = jnp.promote_types(x.dtype, w.dtype)
    return jax.lax.dot_general(
        x.astype(dtype),
        w.astype(dtype),
        (((1,), (1,)), ((), ())),
        precision=jax.lax.Precision.HIGHEST,  # fp32 stays fp32 (no TF32 on GPU)
        preferred_element_type=jnp.float32,
    )
