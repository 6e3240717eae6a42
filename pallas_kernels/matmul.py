"""Batch-invariant matmul with fp32 accumulation.

Layout: every weight matrix is `[out, in]` (nn.Linear's, HF's and GGUF's layout; the embedding
`[vocab, hidden]` is the tied lm_head as it stands), and the product is `x @ w^T`.

Invariance: every output row has the bits of one fixed-shape dot, the weight-first product of a
`ROW_TILE`-row tile, `(w[N, K] @ t^T[K, ROW_TILE])^T`, computed one tile at a time in a loop XLA
cannot see through (`tiling.map_row_tiles`). XLA's own dot changes kernels with the row count (a
1-row product goes to a matrix-vector kernel), and the weight-first orientation streams the weight
once per tile through the GEMM's large operand instead of re-packing it as the small one (BUILD.md
has the measured gain). The transposes sit behind `optimization_barrier`s, so XLA cannot fold them
back into the slow orientation.

Small batches: a batch of fewer than ROW_TILE rows runs one tile of `small_tile(rows)` rows (the
next power of two, at least 2) instead of a padded ROW_TILE tile, but only where that smaller tile
was checked, on this machine and for this weight shape and dtype, to give every row exactly the
bits of the ROW_TILE tile (`small_tiles_agree`, run once per shape when a step is traced; XLA:CPU's
dot library picks its kernel from the dot's shape, so this is measured, not assumed). Where it
does not agree, the ROW_TILE tile runs: the numerics are the ROW_TILE tile's either way; only the
speed changes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.tiling import first_rows_agree, map_row_tiles, smallest_tile

_NT = (((1,), (1,)), ((), ()))  # contract the last axes of both operands

# Rows per weight-first tile. Part of the numerics contract: changing it changes bits.
ROW_TILE = 16
SMALL_TILES = (2, 4, 8)  # the smaller tiles a batch under ROW_TILE rows may use instead


def reference(x: jax.Array, w: jax.Array) -> jax.Array:
    """f32[M, N] = x[M, K] @ w[N, K]^T, XLA's dot with fp32 accumulation (no invariance promise)."""
    return jax.lax.dot_general(x, w, _NT, preferred_element_type=jnp.float32)


def weight_first(t: jax.Array, *ws: jax.Array) -> jax.Array:
    """f32[T, N] = (w[N, K] @ t[T, K]^T)^T, in that orientation (see module doc).

    With several weights (column blocks), one dot per block and their outputs side by side:
    f32[T, sum of N] (t and the result are transposed once, not per block).
    """
    barrier = jax.lax.optimization_barrier
    t = barrier(t)
    out = [jax.lax.dot_general(w, t, _NT, preferred_element_type=jnp.float32) for w in ws]
    return barrier(out[0] if len(out) == 1 else jnp.concatenate(out, axis=0)).T


@functools.lru_cache(maxsize=None)
def small_tiles_agree(k: int, x_dtype: str, w_shapes: tuple[tuple[int, int], ...], w_dtype: str) -> bool:
    """Whether, on this machine, weight-first tiles of every SMALL_TILES size give each row the bits
    of the ROW_TILE tile, for activations [*, k] of x_dtype and weights of w_shapes and w_dtype
    (one shape per column block). Checked on random values: a kernel with another reduction order
    changes most of the outputs. The values are drawn on the host (numpy): a jax draw of a
    [vocab, hidden] weight inside the trace is constant-folded into an executable that holds it."""
    with jax.ensure_compile_time_eval():  # runs now, also while a step is being traced
        rng = np.random.default_rng(0)
        ws = [jnp.asarray(rng.standard_normal(s, np.float32), w_dtype) for s in w_shapes]
        x = jnp.asarray(rng.standard_normal((ROW_TILE, k), np.float32), x_dtype)
        dot = jax.jit(weight_first)
        return first_rows_agree(lambda t: dot(x[:t], *ws), ROW_TILE, SMALL_TILES)


def small_tile(rows: int, x: jax.Array, *ws: jax.Array) -> int:
    """The tile a batch of `rows` rows of x runs in with weights ws (see the module docstring)."""
    shapes = tuple(tuple(w.shape) for w in ws)
    key = (x.shape[1], jnp.dtype(x.dtype).name, shapes, jnp.dtype(ws[0].dtype).name)
    return smallest_tile(rows, ROW_TILE, SMALL_TILES, lambda: small_tiles_agree(*key))


# Above this many rows XLA's own orientation wins on CPU (measured per shape: BUILD.md).
FAST_WEIGHT_FIRST_MAX_ROWS = 64


def fast(x: jax.Array, w: jax.Array) -> jax.Array:
    """f32[M, N]: `reference` in whichever orientation is faster on CPU for M rows, untiled (the
    CPU backend's "fast" numerics: no invariance promise)."""
    return weight_first(x, w) if x.shape[0] <= FAST_WEIGHT_FIRST_MAX_ROWS else reference(x, w)


def _tiled(x: jax.Array, *ws: jax.Array) -> jax.Array:
    tile = small_tile(x.shape[0], x, *ws)
    return map_row_tiles(lambda t: weight_first(t, *ws), x, tile=tile)


def cpu(x: jax.Array, w: jax.Array) -> jax.Array:
    """f32[M, N]: `reference`, computed one weight-first tile at a time (see the module docstring)."""
    return _tiled(x, w)


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
    return _tiled(x, *_column_blocks(w, blocks))
