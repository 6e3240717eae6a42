"""Batch-invariant matmul with fp32 accumulation.

Layout: every weight matrix is `[out, in]` (nn.Linear's, HF's and GGUF's layout; the embedding
`[vocab, hidden]` is the tied lm_head as it stands), and the product is `x @ w^T`.

Invariance: every output row is produced by the same fixed-shape dot. On CPU that is one
`[ROW_TILE, K]` tile of rows at a time (XLA's own dot changes kernels with the row count: a 1-row
product goes to a matrix-vector kernel, a 256-row one re-blocks K), computed weight-first,
`(w[N, K] @ t^T[K, ROW_TILE])^T`. That orientation streams the weight once per tile through
the GEMM's large operand instead of re-packing it as the small one (BUILD.md has the measured
gain), and for the lm_head a single whole-vocabulary dot beats vocabulary tiles. The transposes
sit behind `optimization_barrier`s, so XLA cannot fold them back into the slow orientation; a
column's bits are still fixed for a given N.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.tiling import map_row_tiles

_NT = (((1,), (1,)), ((), ()))  # contract the last axes of both operands


def reference(x: jax.Array, w: jax.Array) -> jax.Array:
    """f32[M, N] = x[M, K] @ w[N, K]^T, XLA's dot with fp32 accumulation (no invariance promise)."""
    return jax.lax.dot_general(x, w, _NT, preferred_element_type=jnp.float32)


def _weight_first(t: jax.Array, *ws: jax.Array) -> jax.Array:
    """f32[ROW_TILE, N] = (w[N, K] @ t[ROW_TILE, K]^T)^T, in that orientation (see module doc).

    With several weights (column blocks), one dot per block and their outputs side by side:
    f32[ROW_TILE, sum of N] (t and the result are transposed once, not per block).
    """
    barrier = jax.lax.optimization_barrier
    t = barrier(t)
    out = [jax.lax.dot_general(w, t, _NT, preferred_element_type=jnp.float32) for w in ws]
    return barrier(out[0] if len(out) == 1 else jnp.concatenate(out, axis=0)).T


# Above this many rows XLA's own orientation wins on CPU (measured per shape: BUILD.md).
FAST_WEIGHT_FIRST_MAX_ROWS = 64


def fast(x: jax.Array, w: jax.Array) -> jax.Array:
    """f32[M, N]: `reference` in whichever orientation is faster on CPU for M rows, untiled (the
    CPU backend's "fast" numerics: no invariance promise)."""
    return _weight_first(x, w) if x.shape[0] <= FAST_WEIGHT_FIRST_MAX_ROWS else reference(x, w)


def cpu(x: jax.Array, w: jax.Array) -> jax.Array:
    """f32[M, N]: `reference`, computed one fixed `ROW_TILE`-row tile at a time."""
    return map_row_tiles(lambda t: _weight_first(t, w), x)


# -- column blocks (tensor-parallel-invariant numerics) ---------------------------------------
# XLA's CPU dot is row-invariant with fixed row tiles but NOT column-invariant: a column's bits
# change with the number of columns N of the dot. With `column_blocks = C` every output column is
# computed by a fixed dot against N / C weight rows, so a device holding N / tp rows of the weight
# (C / tp blocks) and a single device holding all N (C blocks) produce the same bits.


def _column_blocks(w: jax.Array, blocks: int) -> list[jax.Array]:
    """w[N, K] split into `blocks` consecutive blocks of N / blocks output rows."""
    n = w.shape[0]
    if n % blocks:
        raise ValueError(f"column_blocks={blocks} does not divide the {n} output columns")
    tn = n // blocks
    return [w[b * tn : (b + 1) * tn] for b in range(blocks)]


def column_blocked(fn, x: jax.Array, w: jax.Array, blocks: int) -> jax.Array:
    """f32[M, N] = concat_b fn(x, w[b-th block of N / blocks rows]) (any backend's matmul)."""
    return jnp.concatenate([fn(x, wb) for wb in _column_blocks(w, blocks)], axis=1)


def cpu_column_blocked(x: jax.Array, w: jax.Array, blocks: int) -> jax.Array:
    """`cpu` with one fixed dot per column block (one row-tile loop, blocks inside; the weight
    blocks are sliced once, outside the loop)."""
    ws = _column_blocks(w, blocks)
    return map_row_tiles(lambda t: _weight_first(t, *ws), x)
