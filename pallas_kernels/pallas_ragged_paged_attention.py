"""Ragged paged attention as a generic Pallas kernel (grid + BlockSpecs): Triton on GPU, the
HLO interpreter with `interpret=True` on CPU (see `pallas_common`; the Triton backend is
deprecated from JAX 0.11). TPU runs `tpu_ragged_paged_attention`, which shares the block update
below. Layout, masking and results are those of `ragged_paged_attention.reference`/`cpu`.

One program per (token, kv head) computes the token's `group = heads // kv_heads` query heads
against its own sequence's keys: KV blocks of KV_BLOCK positions, from the first block its
window can see to the block holding its position, in logical order, with an fp32 online
softmax. Every block it visits holds at least one visible key, so a skipped block is an exact
no-op; keys past the token's position inside a block are masked (scores to -inf, values to 0,
so NaN garbage in unwritten slots cannot leak). A token's arithmetic reads nothing of the other
tokens, so its bits do not depend on the batch, on its row, on page placement, or on whether it
came in a prefill chunk or alone. Padding tokens (position -1 or seq id < 0) give zeros.

Cost note: one program per token suits decode; a prefill chunk re-reads its prefix once per
token. A sequence-tiled prefill path would share K/V blocks across a chunk's tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import ragged_paged_attention as _rpa
from pallas_kernels.pallas_common import Interpret, pallas_call
from pallas_kernels.ragged_paged_attention import KV_BLOCK

_NEG = -1e30  # running-max seed: finite, so exp(seed - m) is exactly 0 once a key is seen
_MIN_GROUP = 16  # Triton's smallest dot dimension: query heads are zero-padded up to it


def kernel(
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
    interpret: Interpret = False,
) -> jax.Array:
    """q[T, heads, D] -> [T, heads, D] in q's dtype; arguments as `ragged_paged_attention.reference`.

    k_pages, v_pages: [num_pages, page_size, kv_heads, D]; page_table: i32[max_seqs, pages_per_seq];
    seq_ids, positions: i32[T]. Page ids are clamped into range (only masked keys may use them).
    """
    num_tokens, heads, head_dim = q.shape
    num_pages, page_size, kv_heads, _ = k_pages.shape
    group = validate(q, k_pages, v_pages, sliding_window)
    width = min(page_size, KV_BLOCK)  # key positions taken from one page per block step
    pages_per_block = KV_BLOCK // width
    rows = jnp.clip(page_table[jnp.maximum(seq_ids, 0)], 0, num_pages - 1)  # i32[T, pages_per_seq]
    rows = jnp.pad(rows, ((0, 0), (0, -rows.shape[1] % pages_per_block)))
    positions = jnp.where(seq_ids >= 0, positions, -1).astype(jnp.int32)
    padded_group = max(_MIN_GROUP, pl.next_power_of_2(group))
    qg = q.reshape(num_tokens, kv_heads, group, head_dim)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, padded_group - group), (0, 0)))

    head_block = (None, None, padded_group, head_dim)  # squeezed token and kv-head axes
    page_block = (num_pages, page_size, None, head_dim)  # one kv head of every page
    out = pallas_call(
        functools.partial(
            _token_kernel,
            width=width,
            sm_scale=sm_scale,
            sliding_window=sliding_window,
            soft_cap=soft_cap,
        ),
        grid=(num_tokens, kv_heads),
        in_specs=[
            pl.BlockSpec((1,), lambda t, h: (t,)),
            pl.BlockSpec((None, rows.shape[1]), lambda t, h: (t, 0)),
            pl.BlockSpec(head_block, lambda t, h: (t, h, 0, 0)),
            pl.BlockSpec(page_block, lambda t, h: (0, 0, h, 0)),
            pl.BlockSpec(page_block, lambda t, h: (0, 0, h, 0)),
        ],
        out_specs=pl.BlockSpec(head_block, lambda t, h: (t, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        interpret=interpret,
        name="ragged_paged_attention",
        tpu=False,  # whole-array K/V blocks: TPU runs tpu_ragged_paged_attention
    )(positions, rows, qg, k_pages, v_pages)
    return out[:, :, :group].reshape(num_tokens, heads, head_dim)


def validate(
    q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, sliding_window: int | None
) -> int:
    """Checks shapes at trace time; returns the GQA group size `heads // kv_heads`."""
    heads, head_dim = q.shape[1:]
    page_size, kv_heads, kv_dim = k_pages.shape[1:]
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"{v_pages.shape=} must equal {k_pages.shape=}")
    if kv_dim != head_dim or heads % kv_heads:
        raise ValueError(
            f"q{q.shape} does not match pages{k_pages.shape} (heads % kv_heads, head_dim)"
        )
    if KV_BLOCK % page_size and page_size % KV_BLOCK:
        raise ValueError(f"{page_size=} must divide or be a multiple of {KV_BLOCK=}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"{sliding_window=} must be positive")
    return heads // kv_heads


def block_range(pos: jax.Array, sliding_window: int | None) -> tuple[jax.Array, jax.Array]:
    """[first, end) KV blocks that hold a key visible to a token at `pos` (empty if pos < 0);
    the blocks before `first` lie wholly outside the window and are skipped."""
    end = jnp.where(pos >= 0, pos // KV_BLOCK + 1, 0)
    return _rpa.first_block(pos, sliding_window), end


def init_state(rows: int, head_dim: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(max f32[rows, 1], sum f32[rows, 1], acc f32[rows, head_dim]) before any key."""
    return (
        jnp.full((rows, 1), _NEG, jnp.float32),
        jnp.zeros((rows, 1), jnp.float32),
        jnp.zeros((rows, head_dim), jnp.float32),
    )


def absorb_block(
    state: tuple[jax.Array, jax.Array, jax.Array],
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    block: jax.Array,
    pos: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One online-softmax step: q f32[G, D] against KV block `block`, k/v [KV_BLOCK, D].

    The block must hold at least one key visible at `pos` (see `block_range`).
    """
    m, l, acc = state
    key_pos = block * KV_BLOCK + jax.lax.broadcasted_iota(jnp.int32, (1, KV_BLOCK), 1)
    visible = key_pos <= pos
    if sliding_window is not None:
        visible &= key_pos > pos - sliding_window
    s = _dot(q, k.astype(jnp.float32), contract_rhs=1) * sm_scale  # [G, KV_BLOCK]
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    s = jnp.where(visible, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new)
    v = jnp.where(visible.reshape(KV_BLOCK, 1), v.astype(jnp.float32), 0.0)
    return (
        m_new,
        l * alpha + jnp.sum(p, axis=1, keepdims=True),
        acc * alpha + _dot(p, v, contract_rhs=0),
    )


def finish(state: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
    """acc / sum, or zeros for a token that saw no key."""
    _, l, acc = state
    return acc / jnp.where(l > 0, l, 1.0)


def _dot(a: jax.Array, b: jax.Array, *, contract_rhs: int) -> jax.Array:
    dims = (((1,), (contract_rhs,)), ((), ()))
    return jax.lax.dot_general(
        a, b, dims, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32
    )


def _token_kernel(
    pos_ref,  # i32[1]
    rows_ref,  # i32[pages_per_seq]: the token's page row
    q_ref,  # [padded_group, D]
    k_ref,  # [num_pages, page_size, D]: this kv head
    v_ref,  # [num_pages, page_size, D]
    o_ref,  # [padded_group, D]
    *,
    width: int,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
) -> None:
    pos = pos_ref[0]
    page_size = k_ref.shape[1]
    pages_per_block = KV_BLOCK // width
    q = q_ref[...].astype(jnp.float32)

    def step(block, state):
        first_key = block * KV_BLOCK
        ids = rows_ref[pl.ds(first_key // page_size, pages_per_block)]
        keys = (ids, pl.ds(first_key % page_size, width), slice(None))
        k = k_ref[keys].reshape(KV_BLOCK, -1)
        v = v_ref[keys].reshape(KV_BLOCK, -1)
        return absorb_block(
            state, q, k, v, block, pos,
            sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
        )  # fmt: skip

    first, end = block_range(pos, sliding_window)
    state = jax.lax.fori_loop(first, end, step, init_state(*q.shape))
    o_ref[...] = finish(state).astype(o_ref.dtype)
