"""`tiling`: rows short of a whole tile keep the bits they have in a whole one; `tree_sum` adds in
one fixed order."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jengine.models.transformer import apply_rope
from pallas_kernels.tiling import map_row_tiles, tree_sum
from tests.pallas_kernels.checks import assert_bitwise


def test_a_partial_tile_keeps_the_bits_its_rows_have_in_a_whole_tile():
    """The rows come from RoPE (sin and cos) in the same program. Padded outside the loop, the pad
    was fused into RoPE's element-wise loop, which then gave other bits for 1-8 rows than for 16."""
    rng = np.random.default_rng(0)
    head_dim = 16
    inv_freq = (1.0 / 10000 ** (np.arange(0, head_dim, 2) / head_dim)).astype(np.float32)
    x = jnp.asarray(rng.standard_normal((16, 8, head_dim)), jnp.float32)
    positions = jnp.arange(16, dtype=jnp.int32) + 100
    w = jnp.asarray(rng.standard_normal((head_dim, head_dim)), jnp.float32)

    @jax.jit
    def f(x, positions):
        rows = apply_rope(x, positions, inv_freq)
        return map_row_tiles(lambda t: jnp.einsum("thd,de->the", t, w), rows, tile=16)

    full = f(x, positions)
    for rows in (1, 2, 3, 4, 8, 15):
        assert_bitwise(f(x[:rows], positions[:rows]), full[:rows])


def test_tree_sum_is_a_fixed_pairwise_tree():
    """Halves added element-wise: ((a0 + a2) + (a1 + a3)) for four entries, zero-padded to a power
    of two, whatever the rows."""
    x = jnp.asarray([[1e8, 1.0, -1e8, 1.0]], jnp.float32)  # left to right would give 1.0
    assert float(tree_sum(x)[0]) == (1e8 + -1e8) + (1.0 + 1.0)
    y = jnp.asarray([[1e8, 1.0, -1e8]], jnp.float32)  # padded: (1e8 + -1e8) + (1.0 + 0.0)
    assert float(tree_sum(y)[0]) == 1.0
    rng = np.random.default_rng(0)
    p = jnp.asarray(rng.random((16, 3, 3, 192)), jnp.float32)
    full = np.asarray(jax.jit(tree_sum)(p))
    for rows in (1, 2, 4, 8):
        assert_bitwise(jax.jit(tree_sum)(p[:rows]), jnp.asarray(full[:rows]))

