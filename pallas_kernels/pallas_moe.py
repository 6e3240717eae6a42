"""The batch-invariant expert kernel in Pallas: a grouped matmul (megablox's layout) run three
times, gate, up and down, over the tokens grouped by expert (`moe.group`). Same math and layout
as `moe.reference` / `moe.cpu`.

    gmm(lhs[R, K], w[E, N, K], tile_expert, num_used) -> f32[R, N]:
        rows i*TILE..(i+1)*TILE-1 of the result are lhs's rows of tile i @ w[tile_expert[i]]^T

The buffer of R = num_tiles * TILE rows holds each expert's rows padded to whole tiles; its size
is a static bound (`moe.num_tiles`), so a step compiles once per token bucket. A program owns one
[TILE, bn] block of one tile: blocks are those of the invariant matmul (`pallas_matmul`: TILE =
its BLOCK_M rows, bn and bk from (N, K) only, the last column block shifted to end at N, fp32
accumulation over K blocks in order), so a row's value is the fixed sequence of fixed-shape dots
`pallas_matmul` gives it (bitwise: tests/pallas_kernels/test_moe.py), whatever its expert
received and wherever it sits. Tiles past the used ones (`num_used`) compute nothing; their rows
are never read. The down projection multiplies each output row by its gate weight before the
store (`row_scale`), and the k weighted rows of a token are summed by rank outside
(`moe.combine`). Gate and up are two calls, not one over [2I, H]: each has the bits of its own
`ops.matmul`, as the dense MLP's do.

Two lowerings, chosen by the platform as the other kernels are (`pallas_common`):
  * `kernel` (Triton on GPU, the HLO interpreter on CPU): grid (column blocks, tiles); the tile's
    expert is an input block, and the program reads its [bn, bk] weight blocks from the whole
    stacked weight itself, over K in order (`pallas_matmul.k_blocked_dot`);
  * `tpu_kernel` (Mosaic TPU, megablox style): grid (column blocks, tiles, K blocks);
    `tile_expert` and `num_used` are scalar-prefetched into SMEM, the weight's BlockSpec picks the
    [bn, bk] block of `tile_expert[i]`, and an fp32 accumulator in VMEM adds the K blocks in order
    from zeros, the same sum. VMEM holds a few [32, 512] / [256, 512] blocks whatever K is; past
    the used tiles every block index stays on the last used one, so nothing more is fetched. Each
    tile re-reads its expert's weight blocks (K is innermost): weight traffic is tiles x blocks,
    one pass per expert at decode.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import moe
from pallas_kernels.pallas_common import TPU_INTERPRET, Interpret, pallas_call
from pallas_kernels.pallas_matmul import (
    BLOCK_M,
    block_dot,
    check_blocks,
    column_blocking,
    drop_shifted_columns,
    first_column,
    k_blocked_dot,
)

TILE = BLOCK_M  # rows per expert tile: the invariant matmul's row block (numerics contract)

Gmm = Callable[..., jax.Array]


def kernel(x, expert_ids, weights, w_gate, w_up, w_down, *, interpret: Interpret = False,
           by_rank: bool = False):  # fmt: skip
    """[T, H] in x's dtype; arguments and layout as `moe.reference`. Triton on GPU, the HLO
    interpreter with `interpret=True`."""
    grouped = functools.partial(gmm, interpret=interpret)
    return _experts(grouped, x, expert_ids, weights, w_gate, w_up, w_down, by_rank)


def tpu_kernel(x, expert_ids, weights, w_gate, w_up, w_down, *, interpret: Interpret = False,
               by_rank: bool = False):  # fmt: skip
    """`kernel` for Mosaic TPU; `interpret` True or a `pltpu.InterpretParams` runs TPU interpret
    mode (True: `pallas_common.TPU_INTERPRET`, every check on)."""
    params = TPU_INTERPRET if interpret is True else interpret
    gmm_tpu = functools.partial(tpu_gmm, interpret=params)
    return _experts(gmm_tpu, x, expert_ids, weights, w_gate, w_up, w_down, by_rank)


def _experts(grouped: Gmm, x, expert_ids, weights, w_gate, w_up, w_down, by_rank) -> jax.Array:
    moe.validate(x, expert_ids, weights, w_gate, w_up, w_down)
    g = moe.group(expert_ids, w_gate.shape[0], TILE)
    rows = moe.gather_rows(x, g.row_token)
    h = moe.swiglu(grouped(rows, w_gate, g), grouped(rows, w_up, g), x.dtype)
    products = grouped(h, w_down, g, row_scale=moe.row_weights(g, weights))
    return moe.finish(products, g.dest, x.dtype, by_rank)


def _check(lhs: jax.Array, w: jax.Array) -> tuple[int, int, int]:
    """(K, N, bk) after checking lhs[R, K] against w[E, N, K]."""
    rows, k = lhs.shape
    if w.ndim != 3 or w.shape[2] != k or rows % TILE:
        raise ValueError(
            f"lhs{lhs.shape} (rows a multiple of {TILE}) and w{w.shape} ([E, N, K]) disagree"
        )
    n = w.shape[1]
    return k, n, check_blocks(k, n)


def gmm(
    lhs: jax.Array,
    w: jax.Array,
    g: moe.Grouping,
    *,
    row_scale: jax.Array | None = None,
    interpret: Interpret = False,
) -> jax.Array:
    """f32[R, N]: tile i of lhs[R, K] times w[tile_expert[i]]^T (w: [E, N, K]), each row times
    row_scale[R, 1] when given. Triton / HLO interpreter (module doc)."""
    k, n, bk = _check(lhs, w)
    bn, num_n = column_blocking(n)
    tiles = lhs.shape[0] // TILE
    scalar = pl.BlockSpec((1,), lambda j, i: (i,))
    in_specs = [
        scalar,  # tile_expert
        pl.BlockSpec((1,), lambda j, i: (0,)),  # num_used
        pl.BlockSpec((TILE, k), lambda j, i: (i, 0)),
        pl.BlockSpec(w.shape, lambda j, i: (0, 0, 0)),  # whole: the program picks its expert
    ]
    args = [g.tile_expert, g.num_used, lhs, w]
    if row_scale is not None:
        in_specs.append(pl.BlockSpec((TILE, 1), lambda j, i: (i, 0)))
        args.append(row_scale)
    out = pallas_call(
        functools.partial(_gmm_block, bk=bk, bn=bn, n=n, scaled=row_scale is not None),
        grid=(num_n, tiles),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((TILE, bn), lambda j, i: (i, j)),
        out_shape=jax.ShapeDtypeStruct((lhs.shape[0], num_n * bn), jnp.float32),
        interpret=interpret,
        name="grouped_matmul",
        tpu=False,  # whole-array weight block: TPU runs tpu_gmm
    )(*args)
    return drop_shifted_columns(out, n)


def _gmm_block(expert_ref, used_ref, x_ref, w_ref, *refs, bk: int, bn: int, n: int, scaled: bool):
    """One [TILE, bn] block of tile program_id(1) (skipped past the used tiles): its expert's weight
    rows are read from the whole [E, N, K] weight, one [bn, bk] block per K step."""
    scale_ref, o_ref = refs if scaled else (None, refs[0])
    j, i = pl.program_id(0), pl.program_id(1)

    @pl.when(i < used_ref[0])
    def _():
        e, cols = expert_ref[0], pl.ds(first_column(j, n, bn), bn)
        weight = lambda ks: w_ref[e, cols, ks]  # noqa: E731
        acc = k_blocked_dot(lambda ks: x_ref[:, ks], weight, x_ref.shape[1], bk, o_ref.shape)
        o_ref[...] = acc if scale_ref is None else acc * scale_ref[...]


def tpu_gmm(
    lhs: jax.Array,
    w: jax.Array,
    g: moe.Grouping,
    *,
    row_scale: jax.Array | None = None,
    interpret: Interpret = False,
) -> jax.Array:
    """`gmm` for Mosaic TPU (module doc): grid (column blocks, tiles, K blocks), tile_expert and
    num_used scalar-prefetched, the [bn, bk] weight block of `tile_expert[i]` fetched by the
    pipeline, an fp32 [TILE, bn] accumulator in VMEM. Past the used tiles every index stays on the
    last used block, so nothing is fetched for them."""
    k, n, bk = _check(lhs, w)
    bn, num_n = column_blocking(n)
    tiles, num_k = lhs.shape[0] // TILE, k // bk

    def used(i, used_ref):  # (tile, K block) to fetch: past the used tiles, the last one fetched
        live = i < used_ref[0]
        return jnp.where(live, i, used_ref[0] - 1), live

    def lhs_block(j, i, kk, expert_ref, used_ref):
        tile, live = used(i, used_ref)
        return tile, jnp.where(live, kk, num_k - 1)

    def weight_block(j, i, kk, expert_ref, used_ref):
        _, live = used(i, used_ref)
        return expert_ref[i], first_column(j, n, bn), jnp.where(live, kk, num_k - 1) * bk

    in_specs = [
        pl.BlockSpec((TILE, bk), lhs_block),
        pl.BlockSpec((None, pl.Element(bn), pl.Element(bk)), weight_block),
    ]
    args = [lhs, w]
    if row_scale is not None:
        in_specs.append(pl.BlockSpec((TILE, 1), lambda j, i, kk, *_: (i, 0)))
        args.append(row_scale)
    out = pl.pallas_call(
        functools.partial(_tpu_gmm_block, scaled=row_scale is not None),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(num_n, tiles, num_k),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((TILE, bn), lambda j, i, kk, *_: (i, j)),
            scratch_shapes=[pltpu.VMEM((TILE, bn), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct((lhs.shape[0], num_n * bn), jnp.float32),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
        name="tpu_grouped_matmul",
    )(g.tile_expert, g.num_used, *args)
    return drop_shifted_columns(out, n)


def _tpu_gmm_block(expert_ref, used_ref, x_ref, w_ref, *refs, scaled: bool):
    """K step program_id(2) of a [TILE, bn] block: acc (from zeros) + block_dot, in K order, the
    sum `k_blocked_dot` makes; the last step stores it (times the row scale)."""
    scale_ref, o_ref, acc_ref = refs if scaled else (None, *refs)
    kk, last = pl.program_id(2), pl.num_programs(2) - 1

    @pl.when(pl.program_id(1) < used_ref[0])
    def _():
        @pl.when(kk == 0)
        def _():
            acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

        acc_ref[...] = acc_ref[...] + block_dot(x_ref[...], w_ref[...])

        @pl.when(kk == last)
        def _():
            acc = acc_ref[...]
            o_ref[...] = acc if scale_ref is None else acc * scale_ref[...]
