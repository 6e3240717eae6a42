"""Ragged paged attention: one op for prefill chunks and decode tokens, and the KV page writes.

Layout (one layer):
  k_pages, v_pages: [num_pages, page_size, kv_heads, head_dim], separate K and V arrays.
  page_table:       i32[max_seqs, pages_per_seq]; row s lists sequence s's pages in logical order.
  Token t of the flat batch belongs to sequence `seq_ids[t]` and sits at `positions[t]`
  (-1 marks a padding token). It attends to its sequence's keys at positions
  `max(0, positions[t] - window + 1) .. positions[t]`: causal masking by position, so one rule
  serves a decode token and every token of a prefill chunk. The keys must already be written
  (`write_kv` runs before attention in the same step).

Numerical contract (what makes a token's output bitwise independent of its batch):
  * keys are reduced in logical position order in blocks of KV_BLOCK positions, independent of
    page_size, with an online softmax in fp32;
  * a block with no visible key is an exact no-op for that token (state kept by `where`, not by
    arithmetic that could flip the sign of a zero);
  * physical page ids only select where a key is read from, so page placement changes nothing;
  * a block's probabilities are summed in a fixed pairwise tree (`tiling.tree_sum`), not by XLA's
    reduce, whose CPU loop (and so its order) changes with the number of rows reduced;
  * queries are processed in fixed tiles of Q_TILE tokens; a token's arithmetic does not depend on
    the other tokens of its tile (tests check row position, batch size, and prefill vs decode).
    A batch of fewer rows runs one smaller tile (the next power of two) where, for that shape on
    this machine, every smaller tile was checked to give the Q_TILE tile's bits
    (`small_q_tiles_agree`, like the matmul's `small_tiles_agree`).

On the CPU lowering a KV block is gathered as whole units of gcd(page_size, KV_BLOCK) consecutive
positions (contiguous in a page), not position by position: the same values, gathered faster.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.tiling import first_rows_agree, map_row_tiles, smallest_tile, tree_sum

KV_BLOCK = 64  # key positions per online-softmax step; part of the numerics contract
Q_TILE = 16  # query tokens per tile on the CPU lowering
SMALL_Q_TILES = (1, 2, 4, 8)  # the tiles a batch under Q_TILE rows may run instead
_NEG = -1e30  # running-max seed: finite, so exp(m - m) stays 1 for an untouched state


def write_kv(
    k_pages: jax.Array,
    v_pages: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slots: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Writes this step's keys and values into their pages.

    Args:
      k_pages, v_pages: [num_pages, page_size, kv_heads, head_dim].
      k, v: [T, kv_heads, head_dim], cast to the pages' dtype.
      slots: i32[T], `page * page_size + offset`; an out-of-range slot (>= num_pages*page_size,
        used for padding tokens) writes nothing.
    Returns:
      The updated (k_pages, v_pages). Donate the inputs to update in place.
    """
    shape = k_pages.shape
    flat = (shape[0] * shape[1],) + shape[2:]
    k_pages = k_pages.reshape(flat).at[slots].set(k.astype(k_pages.dtype), mode="drop")
    v_pages = v_pages.reshape(flat).at[slots].set(v.astype(v_pages.dtype), mode="drop")
    return k_pages.reshape(shape), v_pages.reshape(shape)


def _visible(key_pos: jax.Array, positions: jax.Array, sliding_window: int | None) -> jax.Array:
    """bool[T, K]: key at key_pos[..., K] is visible to the token at positions[T]."""
    pos = positions[:, None]
    mask = (key_pos <= pos) & (pos >= 0)
    if sliding_window is not None:
        mask &= key_pos > pos - sliding_window
    return mask


def first_block(pos: jax.Array, sliding_window: int | None) -> jax.Array:
    """i32: the first KV block holding a key visible at position `pos` (0 without a window).

    Every lowering starts its walk over KV blocks here: the blocks before it are wholly outside
    the window, so they are skipped, not computed and masked (a fully masked block is an exact
    no-op, so skipping it changes no bit; tests compare the two).
    """
    if sliding_window is None:
        return jnp.int32(0)
    return jnp.maximum(pos - sliding_window + 1, 0) // KV_BLOCK


def apply_soft_cap(s: jax.Array, cap: float | None) -> jax.Array:
    """`cap * tanh(s / cap)` element-wise (Gemma's soft capping), or `s` when cap is None."""
    return s if cap is None else cap * jnp.tanh(s / cap)


def reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    seq_ids: jax.Array,
    positions: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> jax.Array:
    """Plain gather-and-softmax: q[T, heads, D] -> [T, heads, D] in q's dtype.

    Gathers every token's whole page row, so memory is O(T * pages_per_seq * page_size): for tests
    and the backward pass of the differentiable scorer, not for serving.
    """
    num_tokens, heads, head_dim = q.shape
    page_size, kv_heads = k_pages.shape[1], k_pages.shape[2]
    group = heads // kv_heads
    max_len = page_table.shape[1] * page_size
    key_pos = jnp.arange(max_len)
    pages = page_table[seq_ids][:, key_pos // page_size]  # [T, L]
    slots = pages * page_size + key_pos % page_size
    k = k_pages.reshape(-1, kv_heads, head_dim)[slots].astype(jnp.float32)  # [T, L, kvh, D]
    v = v_pages.reshape(-1, kv_heads, head_dim)[slots].astype(jnp.float32)
    mask = _visible(key_pos[None, :], positions, sliding_window)  # [T, L]
    v = jnp.where(mask[:, :, None, None], v, 0.0)
    qg = q.astype(jnp.float32).reshape(num_tokens, kv_heads, group, head_dim)
    s = jnp.einsum("tkgd,tlkd->tkgl", qg, k) * sm_scale
    s = apply_soft_cap(s, soft_cap)
    s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("tkgl,tlkd->tkgd", p, v) / jnp.where(denom > 0, denom, 1.0)
    return out.reshape(num_tokens, heads, head_dim).astype(q.dtype)


def _attend_tile(
    q: jax.Array,
    rows: jax.Array,
    positions: jax.Array,
    k_units: jax.Array,
    v_units: jax.Array,
    *,
    page_size: int,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    kv_head: jax.Array | None = None,
) -> jax.Array:
    """One query tile: q[Q, heads, D], rows i32[Q, pages_per_seq] -> f32[Q, heads, D].

    With `kv_head` (i32[Q]), every query row attends to that one KV head only (see `cpu_head_units`).
    """
    num_q, heads, head_dim = q.shape
    kv_heads = k_units.shape[2] if kv_head is None else 1
    group = heads // kv_heads
    pages_per_seq = rows.shape[1]
    unit = k_units.shape[1]  # key positions per gathered unit (divides page_size and KV_BLOCK)
    units_per_page, units_per_block = page_size // unit, KV_BLOCK // unit
    qg = q.astype(jnp.float32).reshape(num_q, kv_heads, group, head_dim)
    last = jnp.max(positions)
    # skip the blocks no token of the tile can see (padding tokens, position -1, see none)
    first = first_block(jnp.min(jnp.where(positions >= 0, positions, last)), sliding_window)
    num_blocks = jnp.where(last >= 0, last // KV_BLOCK + 1, 0)
    offsets = jnp.arange(KV_BLOCK)

    def gather(units_flat: jax.Array, ids: jax.Array) -> jax.Array:
        """[Q, KV_BLOCK, kvh, D] f32: each token's block, read one contiguous unit at a time."""
        blocks = units_flat[ids].reshape(num_q, KV_BLOCK, *units_flat.shape[2:])
        if kv_head is not None:  # the row's own KV head: [Q, B, 1, D]
            blocks = jnp.take_along_axis(blocks, kv_head[:, None, None, None], axis=2)
        return blocks.astype(jnp.float32)

    def body(carry):
        b, m, l, acc = carry
        key_pos = b * KV_BLOCK + offsets  # [B]
        logical = b * units_per_block + jnp.arange(units_per_block)  # the block's units, in order
        page_idx = jnp.minimum(logical // units_per_page, pages_per_seq - 1)
        ids = rows[:, page_idx] * units_per_page + logical % units_per_page  # [Q, units_per_block]
        mask = _visible(key_pos[None, :], positions, sliding_window)  # [Q, B]
        k = gather(k_units, ids)
        v = jnp.where(mask[:, :, None, None], gather(v_units, ids), 0.0)
        s = jnp.einsum("tkgd,tbkd->tkgb", qg, k) * sm_scale
        s = apply_soft_cap(s, soft_cap)
        s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))  # [Q, kvh, G]
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[..., None])
        l_new = l * alpha + tree_sum(p)
        acc_new = acc * alpha[..., None] + jnp.einsum("tkgb,tbkd->tkgd", p, v)
        seen = jnp.any(mask, axis=-1)[:, None, None]  # an all-masked block keeps the state as is
        return (
            b + 1,
            jnp.where(seen, m_new, m),
            jnp.where(seen, l_new, l),
            jnp.where(seen[..., None], acc_new, acc),
        )

    state = (
        first,
        jnp.full((num_q, kv_heads, group), _NEG, jnp.float32),
        jnp.zeros((num_q, kv_heads, group), jnp.float32),
        jnp.zeros((num_q, kv_heads, group, head_dim), jnp.float32),
    )
    _, _, l, acc = jax.lax.while_loop(lambda c: c[0] < num_blocks, body, state)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]
    return out.reshape(num_q, heads, head_dim)


def _tiles(
    q: jax.Array,
    rows: jax.Array,
    positions: jax.Array,
    kv_head: jax.Array | None,
    k_pages: jax.Array,
    v_pages: jax.Array,
    *,
    tile: int,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
) -> jax.Array:
    """`_attend_tile` over q's rows, `tile` rows at a time: f32[rows, heads, D].

    One layer's pages are viewed as units [-1, unit, kv_heads, head_dim] of
    `unit = gcd(page_size, KV_BLOCK)` consecutive positions: a KV block is gathered as a few
    contiguous units, not position by position. Padding rows added by the tiling sit at position 0
    of row 0: their outputs are dropped and the blocks they add to their tile are no-ops for
    every real row.
    """
    page_size, kv_heads, head_dim = k_pages.shape[1:]
    unit = math.gcd(page_size, KV_BLOCK)
    fn = functools.partial(
        _attend_tile,
        k_units=k_pages.reshape(-1, unit, kv_heads, head_dim),
        v_units=v_pages.reshape(-1, unit, kv_heads, head_dim),
        page_size=page_size,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
    )
    if kv_head is None:
        return map_row_tiles(fn, q, rows, positions, tile=tile)
    tiled = lambda qt, rt, pt, ht: fn(qt, rt, pt, kv_head=ht)  # noqa: E731
    return map_row_tiles(tiled, q, rows, positions, kv_head, tile=tile)


@functools.lru_cache(maxsize=None)
def small_q_tiles_agree(
    row_shape: tuple[int, int], q_dtype: str, page_shape: tuple[int, int, int], kv_dtype: str,
    head_units: bool, sm_scale: float, sliding_window: int | None, soft_cap: float | None,
) -> bool:  # fmt: skip
    """Whether, on this machine, query tiles of every SMALL_Q_TILES size give each row the bits of
    the Q_TILE tile, for query rows [heads, D] of q_dtype over pages [page_size, kv_heads, D] of
    kv_dtype (`head_units`: each row attends to one KV head). Checked on random values over three
    KV blocks: another reduction order changes most of the outputs."""
    with jax.ensure_compile_time_eval():  # runs now, also while a step is being traced
        rng = np.random.default_rng(0)
        pages_per_seq = -(-3 * KV_BLOCK // page_shape[0])
        num_pages = Q_TILE * pages_per_seq
        k, v = (jnp.asarray(rng.standard_normal((num_pages, *page_shape)), kv_dtype) for _ in "kv")
        q = jnp.asarray(rng.standard_normal((Q_TILE, *row_shape)), q_dtype)
        rows = jnp.asarray(rng.permutation(num_pages).reshape(Q_TILE, pages_per_seq), jnp.int32)
        positions = jnp.asarray(rng.integers(0, 3 * KV_BLOCK, Q_TILE), jnp.int32)
        kv_head = jnp.asarray(rng.integers(0, page_shape[1], Q_TILE), jnp.int32) if head_units else None
        run = jax.jit(
            functools.partial(_tiles, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap),
            static_argnames="tile",
        )

        def bits(t: int) -> jax.Array:
            head = None if kv_head is None else kv_head[:t]
            return run(q[:t], rows[:t], positions[:t], head, k, v, tile=t)

        return first_rows_agree(bits, Q_TILE, SMALL_Q_TILES)


def _tiled_attention(q, rows, positions, kv_head, k_pages, v_pages, **kw) -> jax.Array:
    """`_tiles` in Q_TILE-row tiles, or, for fewer rows, in the smallest SMALL_Q_TILES tile that
    covers them where `small_q_tiles_agree` for this shape."""
    key = (tuple(q.shape[1:]), jnp.dtype(q.dtype).name, tuple(k_pages.shape[1:]),
           jnp.dtype(k_pages.dtype).name, kv_head is not None)  # fmt: skip
    agree = lambda: small_q_tiles_agree(*key, **kw)  # noqa: E731
    tile = smallest_tile(q.shape[0], Q_TILE, SMALL_Q_TILES, agree)
    return _tiles(q, rows, positions, kv_head, k_pages, v_pages, tile=tile, **kw)


def cpu(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    seq_ids: jax.Array,
    positions: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> jax.Array:
    """Fixed-block online-softmax attention in plain JAX; same signature as `reference`.

    Each query tile walks only the KV blocks its own tokens can see (up to its largest position),
    so a decode step reads each sequence's live keys once and no masked tail.
    """
    rows = page_table[seq_ids]  # [T, pages_per_seq]
    positions = jnp.where(seq_ids >= 0, positions, -1)
    kw = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    return _tiled_attention(q, rows, positions, None, k_pages, v_pages, **kw).astype(q.dtype)


def cpu_head_units(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    seq_ids: jax.Array,
    positions: jax.Array,
    *,
    unit: int,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> jax.Array:
    """`cpu` computed per fixed head unit: same signature as `cpu` plus `unit` (query heads).

    XLA's CPU reductions are not invariant to the number of heads in a tile, so a device holding a
    slice of the heads (tensor parallelism) would change bits. Here the flat rows are
    (token, unit of `unit` query heads) pairs, each attending to its one KV head with a fixed
    `[tile, unit, D]` computation: a row's bits depend only on its own query heads and KV head,
    not on how many heads the caller holds. `unit` must divide the query heads per KV head.
    """
    num_tokens, heads, head_dim = q.shape
    kv_heads = k_pages.shape[2]
    group = heads // kv_heads
    if heads % unit or group % unit:
        raise ValueError(f"unit={unit} must divide heads={heads} and heads per KV head={group}")
    units = heads // unit
    positions = jnp.where(seq_ids >= 0, positions, -1)
    rows = jnp.repeat(page_table[seq_ids], units, axis=0)  # [T * units, pages_per_seq]
    unit_pos = jnp.repeat(positions, units)
    kv_head = jnp.tile(jnp.arange(units, dtype=jnp.int32) * unit // group, num_tokens)
    q_rows = q.reshape(num_tokens * units, unit, head_dim)
    kw = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    out = _tiled_attention(q_rows, rows, unit_pos, kv_head, k_pages, v_pages, **kw)
    return out.reshape(num_tokens, heads, head_dim).astype(q.dtype)
