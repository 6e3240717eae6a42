"""Batch-invariant log-softmax over the vocabulary (fp32).

`log_softmax(z) = z - logsumexp(z)`, with the max subtracted first. The CPU lowering reduces each
row inside a fixed `[ROW_TILE, V]` tile; masked entries (-inf) stay -inf.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.tiling import map_row_tiles


def reference(z: jax.Array) -> jax.Array:
    """z f32[M, V] -> f32[M, V]; rows may hold -inf (masked) but not all -inf."""
    z = z.astype(jnp.float32)
    m = jnp.max(z, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    lse = jnp.log(jnp.sum(jnp.exp(z - m), axis=-1, keepdims=True)) + m
    return z - lse


def cpu(z: jax.Array) -> jax.Array:
    """`reference`, one fixed `[ROW_TILE, V]` tile at a time."""
    return map_row_tiles(reference, z)
