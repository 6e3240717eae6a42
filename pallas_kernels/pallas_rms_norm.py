"""Batch-invariant Pallas RMSNorm; same values as `rms_norm.reference` (Hugging Face Llama).

x[M, H] (or [M, heads, D], normalised per head) is viewed as rows of width H and cut into
BLOCK_ROWS-row blocks (zero rows pad the last one). A program reduces its rows over H in
chunks of c = the largest power of two <= CHUNK dividing H, in order: `acc[r, :] += x[r, chunk]^2`
elementwise, then one sum over c lanes. The chunk depends on H only and each row's reduction
touches its own values only, so a row's bits do not depend on M or on its position.

See `pallas_common` for the lowering (Triton on GPU, Mosaic on TPU, interpreter on CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.pallas_common import Interpret, pallas_call, pow2_block
from pallas_kernels.tiling import pad_rows

BLOCK_ROWS = 16
CHUNK = 1024


def kernel(x: jax.Array, w: jax.Array, eps: float, *, interpret: Interpret = False) -> jax.Array:
    """x[M, H] or [M, heads, D], w[last axis of x] -> x's shape and dtype."""
    width = x.shape[-1]
    if w.shape != (width,):
        raise ValueError(f"w{w.shape} must be ({width},), the last axis of x{x.shape}")
    rows = x.reshape(-1, width)
    xp = pad_rows(rows, BLOCK_ROWS)
    out = pallas_call(
        functools.partial(_rows_kernel, eps=float(eps), chunk=pow2_block(width, CHUNK)),
        grid=(xp.shape[0] // BLOCK_ROWS,),
        in_specs=[
            pl.BlockSpec((BLOCK_ROWS, width), lambda i: (i, 0)),
            pl.BlockSpec((1, width), lambda i: (0, 0)),
        ],
        out_specs=pl.BlockSpec((BLOCK_ROWS, width), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct(xp.shape, x.dtype),
        interpret=interpret,
        name="rms_norm",
    )(xp, w.reshape(1, width))
    return out[: rows.shape[0]].reshape(x.shape)


def _rows_kernel(x_ref, w_ref, o_ref, *, eps: float, chunk: int) -> None:
    """o = w * (x * rsqrt(mean(x^2) + eps)).astype(x.dtype), statistics in fp32."""
    block_rows, width = x_ref.shape
    num_chunks = width // chunk

    def cols(c):
        return pl.ds(pl.multiple_of(c * chunk, chunk), chunk)

    def square_sum(c, acc):
        xc = x_ref[:, cols(c)].astype(jnp.float32)
        return acc + xc * xc

    acc = jax.lax.fori_loop(0, num_chunks, square_sum, jnp.zeros((block_rows, chunk), jnp.float32))
    var = jnp.sum(acc, axis=1, keepdims=True) / width
    inv = jax.lax.rsqrt(var + eps)

    def scale(c, carry):
        y = (x_ref[:, cols(c)].astype(jnp.float32) * inv).astype(o_ref.dtype)
        o_ref[:, cols(c)] = w_ref[:, cols(c)].astype(o_ref.dtype) * y
        return carry

    jax.lax.fori_loop(0, num_chunks, scale, 0)
