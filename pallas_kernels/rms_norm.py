"""Batch-invariant RMSNorm (Hugging Face Llama semantics).

`y = w * (x32 * rsqrt(mean(x32^2) + eps)).astype(x.dtype)`, statistics in fp32. The CPU lowering
reduces each row inside a fixed `[ROW_TILE, H]` tile so the reduction order never depends on the
row count (sglang-jax traced a batch dependence to RMSNorm's HLO tiling).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.tiling import map_row_tiles


def reference(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """x[M, H], w[H] -> [M, H] in x's dtype."""
    x32 = x.astype(jnp.float32)
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    y = (x32 * jax.lax.rsqrt(var + eps)).astype(x.dtype)
    return w.astype(x.dtype) * y


def cpu(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """`reference`, one fixed `[ROW_TILE, H]` tile at a time. x [M, heads, D] is normalised as
    M * heads rows of D: a `[ROW_TILE, 1, D]` tile (one KV head) was compiled differently in
    different programs and gave a row other bits in another bucket."""
    rows = map_row_tiles(lambda t: reference(t, w, eps), x.reshape(-1, x.shape[-1]))
    return rows.reshape(x.shape)
