"""Batch-invariant matmul with fp32 accumulation, and the vocabulary-tiled lm_head product.

Layouts: layer weights are `[in, out]` (`x @ w`); the lm_head / embedding is `[vocab, hidden]`
(HF's layout, so a tied head needs no transpose) and is contracted on its last axis.

Invariance: every output row is produced by the same fixed-shape dot. On CPU that is
`[ROW_TILE, K] @ [K, N]` (XLA's own dot changes kernels with the row count: a 1-row product goes
to a matrix-vector kernel, a 256-row one re-blocks K). The lm_head is also tiled over the
vocabulary, `[ROW_TILE, K] x [VOCAB_TILE, K]^T`, which is both faster at 49k-150k columns and
keeps each column's tile fixed for a given vocabulary size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.tiling import map_row_tiles

VOCAB_TILE = 2048
_NT = (((1,), (1,)), ((), ()))  # contract x's last axis with w's last axis


def reference(x: jax.Array, w: jax.Array) -> jax.Array:
    """f32[M, N] = x[M, K] @ w[K, N], XLA's dot with fp32 accumulation (no invariance promise)."""
    return jnp.dot(x, w, preferred_element_type=jnp.float32)


def cpu(x: jax.Array, w: jax.Array) -> jax.Array:
    """f32[M, N]: `reference`, computed one fixed `[ROW_TILE, K] @ [K, N]` tile at a time."""
    return map_row_tiles(lambda t: jnp.dot(t, w, preferred_element_type=jnp.float32), x)


def reference_nt(x: jax.Array, w: jax.Array) -> jax.Array:
    """f32[M, V] = x[M, K] @ w[V, K]^T with fp32 accumulation."""
    return jax.lax.dot_general(x, w, _NT, preferred_element_type=jnp.float32)


def _vocab_tile_starts(vocab: int, tile: int) -> list[int]:
    """Start column of each vocab tile; the last tile ends at `vocab` (it may overlap its neighbour)."""
    if vocab <= tile:
        return [0]
    starts = list(range(0, vocab - tile + 1, tile))
    if starts[-1] + tile < vocab:
        starts.append(vocab - tile)
    return starts


def cpu_nt(x: jax.Array, w: jax.Array, vocab_tile: int = VOCAB_TILE) -> jax.Array:
    """f32[M, V] = x[M, K] @ w[V, K]^T in fixed `[ROW_TILE, K] x [vocab_tile, K]^T` tiles.

    Column c is always computed in the same tile at the same offset for a given V, so the
    result is invariant to M and to the row's position. When V is not a multiple of the tile,
    the last tile is shifted left to end at V (no padded copy of a 150k-row weight per step).
    """
    vocab, hidden = w.shape
    tile = min(vocab_tile, vocab)
    starts = _vocab_tile_starts(vocab, tile)
    full = vocab // tile  # tiles that start at a multiple of `tile`

    def row_tile(t: jax.Array) -> jax.Array:
        def one(start: jax.Array) -> jax.Array:
            wt = jax.lax.dynamic_slice_in_dim(w, start, tile, axis=0)
            return jax.lax.dot_general(t, wt, _NT, preferred_element_type=jnp.float32)

        out = jax.lax.map(one, jnp.asarray(starts, jnp.int32))  # [num_tiles, ROW_TILE, tile]
        cols = out[:full].transpose(1, 0, 2).reshape(t.shape[0], full * tile)
        if full < len(starts):  # the shifted last tile supplies the columns past full * tile
            cols = jnp.concatenate([cols, out[-1][:, full * tile - starts[-1] :]], axis=1)
        return cols

    return map_row_tiles(row_tile, x)


# -- column blocks (tensor-parallel-invariant numerics) ---------------------------------------
# XLA's CPU dot is row-invariant with fixed row tiles but NOT column-invariant: a column's bits
# change with the number of columns N of the dot. With `column_blocks = C` every output column is
# computed by a fixed `[ROW_TILE, K] @ [K, N / C]` dot, so a device holding N / tp columns
# (C / tp blocks) and a single device holding all N columns (C blocks) produce the same bits.


def _column_blocks(w: jax.Array, blocks: int) -> list[jax.Array]:
    """w[K, N] split into `blocks` consecutive column blocks of N / blocks columns."""
    n = w.shape[1]
    if n % blocks:
        raise ValueError(f"column_blocks={blocks} does not divide the {n} output columns")
    tn = n // blocks
    return [w[:, b * tn : (b + 1) * tn] for b in range(blocks)]


def column_blocked(fn, x: jax.Array, w: jax.Array, blocks: int) -> jax.Array:
    """f32[M, N] = concat_b fn(x, w[:, b-th block of N / blocks columns]) (any backend's matmul)."""
    return jnp.concatenate([fn(x, wb) for wb in _column_blocks(w, blocks)], axis=1)


def cpu_column_blocked(x: jax.Array, w: jax.Array, blocks: int) -> jax.Array:
    """`cpu` in fixed `[ROW_TILE, K] @ [K, N / blocks]` dots (one row-tile loop, blocks inside;
    the weight blocks are sliced once, outside the loop)."""
    ws = _column_blocks(w, blocks)

    def tile(t: jax.Array) -> jax.Array:
        return jnp.concatenate([jnp.dot(t, wb, preferred_element_type=jnp.float32) for wb in ws], axis=1)

    return map_row_tiles(tile, x)


def vocab_blocked_nt(fn, x: jax.Array, w: jax.Array, blocks: int) -> jax.Array:
    """f32[M, V] = concat_b fn(x, w[b-th block of V / blocks vocabulary rows]) (contiguous rows)."""
    vocab = w.shape[0]
    if vocab % blocks:
        raise ValueError(f"column_blocks={blocks} does not divide vocab_size={vocab}")
    tv = vocab // blocks
    return jnp.concatenate([fn(x, w[b * tv : (b + 1) * tv]) for b in range(blocks)], axis=1)
