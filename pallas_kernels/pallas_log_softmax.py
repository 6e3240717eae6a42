"""Batch-invariant Pallas log-softmax over the vocabulary; same values as `log_softmax.reference`.

z[M, V] is cut into BLOCK_ROWS-row blocks (zero rows pad the last one). A program walks its rows'
vocabulary in tiles of `vocab_tile` = min(VOCAB_TILE, largest power of two <= V) columns, in
order, keeping an online max `m` and sum `l = sum(exp(z - m))` in fp32; then writes `z - lse`
tile by tile. When the tile does not divide V the last tile is shifted left to end at V and its
columns already counted are masked to -inf, so nothing past V is read and nothing is counted
twice. The tiling depends on V only and a row touches only its own values: its bits do not
depend on M or on its position. Masked entries (-inf) stay -inf; a row must not be all -inf.

On Mosaic TPU the whole [BLOCK_ROWS, V] block sits in VMEM, in and out, double-buffered:
128 * V bytes, over v5e's 16 MiB scoped limit from V ~ 131k (Qwen3's 151936) and at v6e's 32 MiB
for V = 262144 (`tpu_vmem`). The engine does not run this kernel (sampling uses the fixed-tile
plain-JAX log-softmax); a TPU caller needs a vocabulary-tiled variant first.

See `pallas_common` for the lowering (Triton on GPU, Mosaic on TPU, interpreter on CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.pallas_common import Interpret, floor_pow2, pallas_call
from pallas_kernels.tiling import pad_rows

BLOCK_ROWS = 8
VOCAB_TILE = 2048


def kernel(z: jax.Array, *, interpret: Interpret = False) -> jax.Array:
    """z[M, V] (any float dtype) -> f32[M, V] log-softmax over the last axis."""
    rows, vocab = z.shape
    zp = pad_rows(z, BLOCK_ROWS)
    out = pallas_call(
        functools.partial(_rows_kernel, tile=min(VOCAB_TILE, floor_pow2(vocab))),
        grid=(zp.shape[0] // BLOCK_ROWS,),
        in_specs=[pl.BlockSpec((BLOCK_ROWS, vocab), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((BLOCK_ROWS, vocab), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct(zp.shape, jnp.float32),
        interpret=interpret,
        name="log_softmax",
    )(zp)
    return out[:rows]


def _rows_kernel(z_ref, o_ref, *, tile: int) -> None:
    block_rows, vocab = z_ref.shape
    num_full = vocab // tile
    shifted = vocab - tile  # start of the last tile when it is not a whole one

    def load(start):
        return z_ref[:, pl.ds(start, tile)].astype(jnp.float32)

    def absorb(zt, state):
        m, l = state
        m_new = jnp.maximum(m, jnp.max(zt, axis=1, keepdims=True))
        shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # nothing but -inf seen yet
        l = l * jnp.exp(m - shift) + jnp.sum(jnp.exp(zt - shift), axis=1, keepdims=True)
        return m_new, l

    def full_tile(t, state):
        return absorb(load(pl.multiple_of(t * tile, tile)), state)

    state = (
        jnp.full((block_rows, 1), -jnp.inf, jnp.float32),
        jnp.zeros((block_rows, 1), jnp.float32),
    )
    m, l = jax.lax.fori_loop(0, num_full, full_tile, state)
    if vocab % tile:
        col = shifted + jax.lax.broadcasted_iota(jnp.int32, (block_rows, tile), 1)
        m, l = absorb(jnp.where(col >= num_full * tile, load(shifted), -jnp.inf), (m, l))
    lse = jnp.log(l) + jnp.where(m == -jnp.inf, 0.0, m)

    def write(start):
        o_ref[:, pl.ds(start, tile)] = load(start) - lse

    def write_tile(t, carry):
        write(pl.multiple_of(t * tile, tile))
        return carry

    jax.lax.fori_loop(0, num_full, write_tile, 0)
    if vocab % tile:
        write(shifted)  # rewrites some columns of the last whole tile with the same values
