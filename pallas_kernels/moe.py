"""Mixture-of-experts: routing (a pure function of a token's router logits) and the batch-invariant
expert kernel (SwiGLU experts over tokens grouped by expert).

Layout: expert weights are stacked, `[out, in]` per expert like every weight of the model:
`w_gate, w_up: [E, I, H]`, `w_down: [E, H, I]` (I = moe_intermediate_size). A token t with
router choices `expert_ids[t] = (e_0, ..., e_{k-1})` (rank order) and gate weights `weights[t]`
(fp32) gets

    h_r   = silu(gate_{e_r}(x_t)) * up_{e_r}(x_t)      gate and up fp32-accumulated, rounded to
                                                       x's dtype, h_r in x's dtype
    p_r   = weights[t, r] * down_{e_r}(h_r)            fp32 (down fp32-accumulated, one rounding)
    out_t = ((p_0 + p_1) + p_2) + ... + p_{k-1}        fp32, by rank, then cast to x's dtype

so down_{e_r}(h_r) is the dense MLP of `jengine.models.transformer` on that expert's weights,
kept in fp32 until the combine. No capacity factor, nothing dropped: every token gets all k of its experts.

Routing (`route`): softmax over the E router logits in fp32, the k largest probabilities with ties
going to the lower expert index, renormalised to sum to 1 when asked (Hugging Face's Qwen3-MoE
`norm_topk_prob` and Mixtral: p_i / sum of the top-k p, which is the softmax over the top-k
logits). Computed row by row in fixed tiles: the max is exact, the normaliser a fixed tree
(`tiling.tree_sum`) and the selection an argmax under the total order (value, then lower index),
whose result no reduction order can change; a token's experts and weights are bits of its own
logits only.

Invariance of the experts (`cpu` here, `pallas_moe` for the Pallas kernels): the T * k
(token, rank) assignments are grouped by expert into a buffer of a static size, each expert's rows
padded to whole tiles of `TILE` rows (`group`); each tile is one fixed-shape computation of one
expert, the invariant matmul's weight-first dot `(w[N, K] @ t[TILE, K]^T)^T` on CPU (the tile of
`matmul.ROW_TILE` rows, so a row has exactly the bits `ops.matmul` gives it), and a row's result
reads its own inputs only. So it does not depend on how many rows its expert received (1 or 60:
one tile or four), on the other rows, on the batch size or on the step. The tile also multiplies
each row by its gate weight; the k products of a token are then summed by rank, never in the
order they sit in the buffer, and in another program than the multiplies (`combine`).

`reference` is the same math through `jax.lax.ragged_dot` (XLA's grouped matmul), with no
invariance promise: the "fast" numerics on accelerators and the gradient of every lowering.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import matmul
from pallas_kernels.tiling import map_row_tiles, tree_sum

# Rows per expert tile on CPU: the invariant matmul's tile (part of the numerics contract).
TILE = matmul.ROW_TILE
ROUTE_TILE = 32  # rows per routing tile: tile * E elements is a whole number of vectors for any E


# -- routing -----------------------------------------------------------------------------------


def top_k(values: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(indices i32[M, k], values [M, k]): the k largest entries of each row of values[M, E], in
    decreasing order; among equal values the lower index comes first.

    k rounds of argmax, each taking the first (lowest-index) maximum and masking it out: argmax
    under the total order (value, then index) gives one answer whatever order it reduces in.
    """
    if not 1 <= k <= values.shape[-1]:
        raise ValueError(f"k={k} must be between 1 and the {values.shape[-1]} experts")
    cols = jax.lax.broadcasted_iota(jnp.int32, values.shape, values.ndim - 1)
    remaining, ids = values, []
    for _ in range(k):
        best = jnp.argmax(remaining, axis=-1).astype(jnp.int32)
        ids.append(best)
        remaining = jnp.where(cols == best[..., None], -jnp.inf, remaining)
    ids = jnp.stack(ids, axis=-1)
    return ids, jnp.take_along_axis(values, ids, axis=-1)


def _route_tile(logits: jax.Array, k: int, renormalize: bool) -> tuple[jax.Array, jax.Array]:
    z = logits.astype(jnp.float32)
    e = jnp.exp(z - jnp.max(z, axis=-1, keepdims=True))
    probs = e / tree_sum(e)[:, None]
    ids, top = top_k(probs, k)
    if renormalize:
        top = top / rank_sum(top)[:, None]
    return ids, top


def rank_sum(values: jax.Array) -> jax.Array:
    """f32[M] = ((v[:, 0] + v[:, 1]) + v[:, 2]) + ...: a row's k values summed by rank."""
    total = values[:, 0]
    for r in range(1, values.shape[1]):
        total = total + values[:, r]
    return total


def route(logits: jax.Array, k: int, *, renormalize: bool) -> tuple[jax.Array, jax.Array]:
    """(expert_ids i32[T, k], weights f32[T, k]) from router logits [T, E] (see the module doc).

    `renormalize`: Qwen3-MoE's `norm_topk_prob` (True for Qwen3-30B-A3B), always True for Mixtral;
    False keeps the top-k softmax probabilities (Qwen2-MoE). Differentiable in the logits (the
    selection is not differentiated, the weights are).
    """
    if logits.ndim != 2 or not 1 <= k <= logits.shape[1]:
        raise ValueError(
            f"router logits {logits.shape} must be [tokens, experts] with 1 <= k={k} <= experts"
        )
    return map_row_tiles(
        lambda z: _route_tile(z, k, renormalize), logits, tile=ROUTE_TILE, differentiable=True
    )


# -- the experts: shared pieces ----------------------------------------------------------------


def validate(
    x: jax.Array,
    expert_ids: jax.Array,
    weights: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
) -> None:
    """Checks shapes and dtypes at trace time (see the module doc for the layout)."""
    if x.ndim != 2:
        raise ValueError(f"x{x.shape} must be [tokens, hidden]")
    tokens, hidden = x.shape
    if expert_ids.ndim != 2 or expert_ids.shape[0] != tokens:
        raise ValueError(f"expert_ids{expert_ids.shape} must be [tokens={tokens}, k]")
    if not jnp.issubdtype(expert_ids.dtype, jnp.integer):
        raise ValueError(f"expert_ids must be integers, not {expert_ids.dtype}")
    if weights.shape != expert_ids.shape:
        raise ValueError(f"weights{weights.shape} must match expert_ids{expert_ids.shape}")
    if w_gate.ndim != 3 or w_gate.shape[2] != hidden:
        raise ValueError(
            f"w_gate{w_gate.shape} must be [experts, moe_intermediate, hidden={hidden}]"
        )
    experts, inter, _ = w_gate.shape
    if w_up.shape != w_gate.shape:
        raise ValueError(f"w_up{w_up.shape} must equal w_gate{w_gate.shape}")
    if w_down.shape != (experts, hidden, inter):
        raise ValueError(
            f"w_down{w_down.shape} must be {(experts, hidden, inter)}: [E, hidden, moe_intermediate]"
        )


def swiglu(gate: jax.Array, up: jax.Array, dtype) -> jax.Array:
    """silu(gate) * up in `dtype` (gate and up rounded to it first, as the dense MLP does)."""
    return jax.nn.silu(gate.astype(dtype)) * up.astype(dtype)


def combine(products: jax.Array, dest: jax.Array, dtype) -> jax.Array:
    """[T, H] in `dtype`: token t's k weighted expert outputs `products[dest[t, r]]` (f32[R, H])
    summed by rank r in fp32, ((p_0 + p_1) + p_2) + ..., then cast.

    The products come out of the expert tiles (a loop or a kernel), so no multiply meets these adds
    in one fusion: XLA:CPU contracts a multiply and an add that do into a fused multiply-add
    (`a * b + c * d` came out as fma(a, b, c * d)), rounding in an order the fusion picks, and an
    `optimization_barrier` between them does not survive its pipeline.
    """
    return sum_by_rank(products[dest], dtype)


def sum_by_rank(products: jax.Array, dtype) -> jax.Array:
    """[T, H] in `dtype`: f32[T, k, H] summed over k in rank order, ((p_0 + p_1) + p_2) + ..."""
    acc = products[:, 0]
    for r in range(1, products.shape[1]):
        acc = acc + products[:, r]
    return acc.astype(dtype)


def finish(products: jax.Array, dest: jax.Array, dtype, by_rank: bool) -> jax.Array:
    """`combine`d, or with `by_rank` each token's k weighted products f32[T, k, H] (rank order)
    left for the caller to combine (expert parallelism gathers them from their devices first)."""
    return products[dest] if by_rank else combine(products, dest, dtype)


@dataclasses.dataclass(frozen=True)
class Grouping:
    """Where each (token, rank) assignment sits in the grouped buffer of `num_tiles * tile` rows.

    row_token i32[R]: the token each buffer row holds (T for a padding row: zeros);
    dest i32[T, k]: the buffer row of assignment (t, r);
    tile_expert i32[num_tiles]: the expert of each tile (tiles past the used ones repeat the last
      used tile's expert, so a TPU pipeline fetches no new weights for them);
    num_used i32[1]: the tiles in use, a prefix of the buffer.
    """

    row_token: jax.Array
    dest: jax.Array
    tile_expert: jax.Array
    num_used: jax.Array


jax.tree_util.register_dataclass(
    Grouping, data_fields=["row_token", "dest", "tile_expert", "num_used"], meta_fields=[]
)


def num_tiles(assignments: int, experts: int, tile: int) -> int:
    """A static bound on the tiles `assignments` rows over `experts` experts need: sum over experts
    of ceil(n_e / tile) <= floor(assignments / tile) + (experts with a partial tile), and every tile
    holds at least one row."""
    return min(assignments, assignments // tile + min(experts, assignments))


def group(expert_ids: jax.Array, experts: int, tile: int) -> Grouping:
    """Groups the T * k assignments of expert_ids[T, k] by expert, each expert's rows (in token,
    then rank order) padded to whole tiles; experts in index order. Integer bookkeeping only: no
    value of any row is touched."""
    tokens, k = expert_ids.shape
    flat = jnp.clip(expert_ids.reshape(-1).astype(jnp.int32), 0, experts - 1)
    count = jnp.zeros((experts,), jnp.int32).at[flat].add(1)
    tiles = -(-count // tile)
    tile_end = jnp.cumsum(tiles)
    first_row = (tile_end - tiles) * tile  # the expert's first buffer row
    order = jnp.argsort(flat, stable=True)
    sorted_ids = flat[order]
    rank_in_expert = (
        jnp.arange(flat.size, dtype=jnp.int32) - (jnp.cumsum(count) - count)[sorted_ids]
    )
    dest = jnp.zeros_like(flat).at[order].set(first_row[sorted_ids] + rank_in_expert)
    size = num_tiles(flat.size, experts, tile)
    row_token = (
        jnp.full((size * tile,), tokens, jnp.int32)
        .at[dest]
        .set(jnp.arange(flat.size, dtype=jnp.int32) // k)
    )
    used = tile_end[-1]
    last = jnp.minimum(jnp.arange(size, dtype=jnp.int32), used - 1)
    tile_expert = jnp.searchsorted(tile_end, last, side="right").astype(jnp.int32)
    return Grouping(row_token, dest.reshape(tokens, k), tile_expert, used.reshape(1))


def gather_rows(x: jax.Array, row_token: jax.Array) -> jax.Array:
    """x[row_token], zeros where row_token is out of range (padding rows)."""
    return jnp.take(x, row_token, axis=0, mode="fill", fill_value=0)


def row_weights(g: Grouping, weights: jax.Array) -> jax.Array:
    """f32[R, 1]: each buffer row's gate weight (0 for padding rows), which its expert tile
    multiplies its output row by."""
    rows = g.row_token.shape[0]
    flat = weights.astype(jnp.float32).reshape(-1)
    return jnp.zeros((rows,), jnp.float32).at[g.dest.reshape(-1)].set(flat)[:, None]


# -- lowerings ---------------------------------------------------------------------------------


def reference(x, expert_ids, weights, w_gate, w_up, w_down, *, by_rank: bool = False) -> jax.Array:
    """[T, H] in x's dtype (module doc), through `jax.lax.ragged_dot` over the assignments sorted by
    expert; plain XLA, differentiable, no invariance promise. `by_rank`: see `finish`."""
    validate(x, expert_ids, weights, w_gate, w_up, w_down)
    tokens, k = expert_ids.shape
    experts = w_gate.shape[0]
    flat = jnp.clip(expert_ids.reshape(-1).astype(jnp.int32), 0, experts - 1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.zeros((experts,), jnp.int32).at[flat].add(1)

    def grouped(lhs, w):  # lhs[A, K] sorted by expert, w[E, N, K] -> f32[A, N]
        dtype = jnp.promote_types(lhs.dtype, w.dtype)
        rhs = jnp.swapaxes(w, 1, 2).astype(dtype)
        return jax.lax.ragged_dot(lhs.astype(dtype), rhs, sizes, preferred_element_type=jnp.float32)

    xs = x[order // k]
    h = swiglu(grouped(xs, w_gate), grouped(xs, w_up), x.dtype)
    y = grouped(h, w_down) * weights.astype(jnp.float32).reshape(-1)[order, None]
    dest = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype))
    return finish(y, dest.reshape(tokens, k), x.dtype, by_rank)  # row i of y: assignment order[i]


def expert_weights(
    stacks: tuple[jax.Array, ...], e: jax.Array, i: jax.Array
) -> tuple[jax.Array, ...]:
    """Expert e's matrices from stacked weights [E, ...], read inside loop iteration i.

    XLA:CPU has no bf16 dynamic-slice: it slices `convert(stack)` to f32, in one fusion that
    converts only the slice. In a loop that convert of a loop-invariant stack was hoisted out of
    the loop, converting every expert's weights on every call (two orders of magnitude over the
    kernel at 1 token). Passing the stacks through an `optimization_barrier` with the loop index
    makes them loop-variant (no copy), so the convert stays fused with the slice."""
    stacks, _ = jax.lax.optimization_barrier((stacks, i))
    return tuple(jax.lax.dynamic_index_in_dim(w, e, keepdims=False) for w in stacks)


def cpu(x, expert_ids, weights, w_gate, w_up, w_down, *, by_rank: bool = False) -> jax.Array:
    """[T, H] in x's dtype: one fixed `[TILE, H]` expert tile at a time (module doc), in a loop over
    the tiles in use whose trip count XLA cannot see; each tile fetches its rows and its expert's
    weights inside the loop. `by_rank`: see `finish`."""
    validate(x, expert_ids, weights, w_gate, w_up, w_down)
    g = group(expert_ids, w_gate.shape[0], TILE)
    rows = g.row_token.shape[0]
    scale = row_weights(g, weights)

    def body(carry):
        i, out = carry
        tokens = jax.lax.dynamic_slice_in_dim(g.row_token, i * TILE, TILE)
        gate, up, down = expert_weights((w_gate, w_up, w_down), g.tile_expert[i], i)
        t = gather_rows(x, tokens)
        h = swiglu(matmul.weight_first(t, gate), matmul.weight_first(t, up), x.dtype)
        y = matmul.weight_first(h, down) * jax.lax.dynamic_slice_in_dim(scale, i * TILE, TILE)
        return i + 1, jax.lax.dynamic_update_slice_in_dim(out, y, i * TILE, 0)

    init = (jnp.int32(0), jnp.zeros((rows, x.shape[1]), jnp.float32))
    used = jax.lax.optimization_barrier(g.num_used[0])
    out = jax.lax.while_loop(lambda c: c[0] < used, body, init)[1]
    return finish(out, g.dest, x.dtype, by_rank)
