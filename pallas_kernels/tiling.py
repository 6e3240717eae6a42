"""Fixed-tile plumbing shared by the CPU lowerings.

The rule every CPU lowering follows: the arithmetic that produces one row runs inside one
fixed-shape computation (a tile of `ROW_TILE` rows), mapped over the rows with `lax.map`. XLA
compiles the tile body once, so a row's bits depend on its own inputs only, not on how many rows
there are or where the row sits (tests/pallas_kernels check both, bitwise).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

# Rows per tile. Part of the numerics contract: changing it changes bits (never results' meaning).
ROW_TILE = 32


def pad_rows(x: jax.Array, multiple: int) -> jax.Array:
    """Pads the leading axis of `x` with zeros up to a multiple of `multiple`."""
    rows = x.shape[0]
    padded = -(-rows // multiple) * multiple
    if padded == rows:
        return x
    return jnp.pad(x, [(0, padded - rows)] + [(0, 0)] * (x.ndim - 1))


def map_row_tiles(fn: Callable[..., jax.Array], *rows: jax.Array, tile: int = ROW_TILE) -> jax.Array:
    """Applies `fn` to `tile`-row slices of every array in `rows` (same leading size) in turn.

    Returns the per-tile results (an array or a pytree of arrays with a leading row axis)
    concatenated and trimmed back to the original row count.
    """
    n = rows[0].shape[0]
    tiled = [pad_rows(r, tile) for r in rows]
    tiled = [r.reshape(r.shape[0] // tile, tile, *r.shape[1:]) for r in tiled]
    out = jax.lax.map(lambda args: fn(*args), tuple(tiled))
    return jax.tree_util.tree_map(lambda o: o.reshape(o.shape[0] * o.shape[1], *o.shape[2:])[:n], out)
