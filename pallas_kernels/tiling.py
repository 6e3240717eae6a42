"""Fixed-tile plumbing shared by the CPU lowerings.

The rule every CPU lowering follows: the arithmetic that produces one row runs inside one
fixed-shape computation (a tile of `ROW_TILE` rows), run once per tile by a loop. XLA compiles the
tile body once, so a row's bits depend on its own inputs only, not on how many rows there are or
where the row sits (tests/pallas_kernels check both, bitwise).

The loop's trip count is hidden from XLA (`optimization_barrier`): a loop XLA can see runs once
would be inlined into the surrounding program, where fusion and layout choices made for the
neighbouring ops can change the tile's dot kernels, and so the bits of a batch that fits one tile
would differ from those of a larger batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Rows per tile. Part of the numerics contract: changing it changes bits (never results' meaning).
ROW_TILE = 32


def smallest_tile(rows: int, tile: int, small: tuple[int, ...], agree: Callable[[], bool]) -> int:
    """The tile `rows` rows run in: `tile`, or, for fewer rows, the smallest of the `small` tiles
    that covers them, where `agree()` (the caller's check, cached per shape) found that every
    `small` tile gives each row exactly the bits of the `tile` tile."""
    covering = next((t for t in small if t >= rows), tile)
    return covering if covering < tile and agree() else tile


def first_rows_agree(bits: Callable[[int], Any], tile: int, small: tuple[int, ...]) -> bool:
    """Whether `bits(t)`, an op's output over the first t rows of fixed inputs, equals the first t
    rows of `bits(tile)` bit for bit, for every t in `small`."""
    want = np.asarray(bits(tile)).view(np.uint32)
    return all(np.array_equal(np.asarray(bits(t)).view(np.uint32), want[:t]) for t in small)


def tree_sum(x: jax.Array) -> jax.Array:
    """Sum over the last axis as a fixed pairwise tree of halves: x[..., N] -> [...].

    The axis is zero-padded to a power of two, then halved by element-wise adds: four entries
    give (x0 + x2) + (x1 + x3). Every add is element-wise, so no fusion, vectorisation or
    reduce-of-reduce merge XLA chooses for the surrounding program can change the order (an XLA
    `reduce` gave a row other bits when a consumer of its partial sums was dead code), and the
    order is the same on every backend. Adding the zero padding changes no bit.
    """
    n = x.shape[-1]
    width = 1 << max(0, (n - 1).bit_length())
    if width != n:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - n)])
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = x[..., :half] + x[..., half:]
    return x[..., 0]


def pad_rows(x: jax.Array, multiple: int) -> jax.Array:
    """Pads the leading axis of `x` with zeros up to a multiple of `multiple`."""
    rows = x.shape[0]
    padded = -(-rows // multiple) * multiple
    if padded == rows:
        return x
    return jnp.pad(x, [(0, padded - rows)] + [(0, 0)] * (x.ndim - 1))


def map_row_tiles(
    fn: Callable[..., jax.Array], *rows: jax.Array, tile: int = ROW_TILE, differentiable: bool = False
) -> jax.Array:
    """Applies `fn` to `tile`-row slices of every array in `rows` (same leading size) in turn.

    Returns the per-tile results (an array or a pytree of arrays with a leading row axis)
    concatenated and trimmed back to the original row count.

    The default loop is opaque to XLA (see the module docstring) and, being a while loop, has no
    reverse-mode derivative: the kernels give their ops the reference's gradient instead
    (`ops.with_reference_grad`). `differentiable=True` maps with `lax.map` (scan) instead, for
    code without dots that is differentiated directly (`sampling.select`); each tile is
    rematerialised (`jax.checkpoint`), so a gradient keeps the tiles' inputs, not every
    intermediate of every tile (for a [rows, vocab] sampler, several vocabulary-wide arrays).
    """
    n = rows[0].shape[0]
    if differentiable:
        tiled = tuple(_tiles(pad_rows(r, tile), tile) for r in rows)
        out = jax.lax.map(jax.checkpoint(lambda args: fn(*args)), tiled)
    else:
        out = _opaque_map(fn, rows, tile)
    return jax.tree_util.tree_map(lambda o: o.reshape(o.shape[0] * o.shape[1], *o.shape[2:])[:n], out)


def _tiles(x: jax.Array, tile: int) -> jax.Array:
    return x.reshape(x.shape[0] // tile, tile, *x.shape[1:])


def _opaque_map(fn: Callable[..., Any], rows: tuple[jax.Array, ...], tile: int) -> Any:
    """`lax.map(fn, <rows in tiles>)` as a while loop whose trip count XLA cannot see.

    Rows short of a whole last tile are fetched inside the loop as zeros (a gather that fills),
    not padded outside it: a pad outside the loop is fused into the rows' producer, whose
    element-wise loop then runs differently (RoPE's sin and cos gave other bits in a padded step
    than in an unpadded one).
    """
    n = rows[0].shape[0]
    num_tiles = -(-n // tile)
    out_shapes = jax.eval_shape(fn, *(jax.ShapeDtypeStruct((tile, *r.shape[1:]), r.dtype) for r in rows))
    init = jax.tree_util.tree_map(lambda s: jnp.zeros((num_tiles, *s.shape), s.dtype), out_shapes)
    count = jax.lax.optimization_barrier(jnp.int32(num_tiles))
    if n % tile == 0:
        tiled = tuple(_tiles(r, tile) for r in rows)
        fetch = lambda i: (jax.lax.dynamic_index_in_dim(t, i, keepdims=False) for t in tiled)  # noqa: E731
    else:
        fetch = lambda i: (  # noqa: E731
            jnp.take(r, i * tile + jnp.arange(tile), axis=0, mode="fill", fill_value=0) for r in rows
        )

    def body(carry):
        i, acc = carry
        res = fn(*fetch(i))
        acc = jax.tree_util.tree_map(lambda a, r: jax.lax.dynamic_update_index_in_dim(a, r, i, 0), acc, res)
        return i + 1, acc

    return jax.lax.while_loop(lambda c: c[0] < count, body, (jnp.int32(0), init))[1]
