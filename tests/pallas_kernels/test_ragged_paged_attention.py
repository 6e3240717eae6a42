"""Ragged paged attention: the CPU lowering, the generic Pallas kernel (HLO interpret mode; Triton
on a GPU machine) and the Mosaic TPU kernel (TPU interpret mode, with race detection and
out-of-bounds checks) against the plain reference and against JAX's own
`ref_ragged_paged_attention`; bitwise invariance to batch, row, page placement and chunking.

Every batch is built from fixed logical content (K/V/Q per sequence position), so the same
token can be placed in different batches, pages and chunks. Slots that were never written,
pages past a sequence's length and spare pages hold NaN: a stray read shows up as NaN.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel as jax_rpa

from jengine.config import Numerics
from pallas_kernels import pallas_common
from pallas_kernels import ops, pallas_ragged_paged_attention, tpu_ragged_paged_attention
from pallas_kernels import ragged_paged_attention as rpa
from tests.pallas_kernels.checks import (
    BACKENDS,
    TPU_INTERPRET_2_CORES,
    assert_bitwise,
    assert_close,
    assert_no_races,
    kernel_calls,
    lower_for,
)

KV_HEADS = 2
SM_SCALE = 0.125
# TPU interpret mode simulates every page DMA and checks each against all earlier accesses of its
# buffer (a 40-token batch of 4-key pages takes ~1 min): its tests use fewer tokens.
FAST_BACKENDS = tuple(b for b in BACKENDS if b != "tpu_interpret")
PAD = (-1, -1)  # a padding token: no sequence, no position

# A ragged step over sequences of 150, 131, 3, 70 and 64 keys: decode tokens, a chunk that
# crosses a KV block boundary (position 128), a whole fresh prompt, a chunk ending on a block's
# last position, and padding tokens in between (a valid sequence with position -1 is padding too).
LENS = (150, 131, 3, 70, 64)
MIXED = [
    (0, 149),
    *[(1, p) for p in range(107, 131)],
    PAD,
    (3, 69),
    *[(2, p) for p in range(3)],
    (0, -1),
    *[(4, p) for p in range(60, 64)],
    PAD,
]
FEW = [(0, 149), (1, 127), (1, 128), PAD, (3, 69), (2, 0), (4, 63)]  # block edges, padding


@dataclasses.dataclass(frozen=True)
class Content:
    """Logical K/V (and a query) for every (sequence, position), whatever page holds it."""

    k: np.ndarray  # f32[seqs, max_len, kv_heads, head_dim]
    v: np.ndarray  # f32[seqs, max_len, kv_heads, head_dim]
    q: np.ndarray  # f32[seqs, max_len, heads, head_dim]


def make_content(seed: int, *, group: int, head_dim: int, lens=LENS) -> Content:
    rng = np.random.default_rng(seed)
    shape = (len(lens), max(lens), KV_HEADS, head_dim)
    q_shape = (len(lens), max(lens), KV_HEADS * group, head_dim)
    return Content(*(rng.standard_normal(s, np.float32) for s in (shape, shape, q_shape)))


def assemble(content: Content, tokens, *, page_size: int, dtype, written=LENS, page_seed: int = 0):
    """Arguments of `attention` for `tokens` [(seq, position)].

    Sequence s has its first `written[s]` positions' K/V in pages drawn in a random order
    (`page_seed`) from a pool with spare pages; everything else in the pool is NaN.
    """
    num_seqs, max_len, kv_heads, head_dim = content.k.shape
    pages_per_seq = -(-max_len // page_size)
    num_pages = num_seqs * pages_per_seq + 3
    table = np.random.default_rng(page_seed).permutation(num_pages)[: num_seqs * pages_per_seq]
    table = table.reshape(num_seqs, pages_per_seq).astype(np.int32)
    k_pages = np.full((num_pages, page_size, kv_heads, head_dim), np.nan, np.float32)
    v_pages = k_pages.copy()
    for s, n in enumerate(written):
        pos = np.arange(n)
        k_pages[table[s, pos // page_size], pos % page_size] = content.k[s, :n]
        v_pages[table[s, pos // page_size], pos % page_size] = content.v[s, :n]
    seq_ids, positions = (np.asarray(a, np.int32) for a in zip(*tokens, strict=True))
    q = np.where((positions >= 0)[:, None, None], content.q[seq_ids, positions], 0.0)
    return (
        jnp.asarray(q, dtype),
        jnp.asarray(k_pages, dtype),
        jnp.asarray(v_pages, dtype),
        jnp.asarray(table),
        jnp.asarray(seq_ids),
        jnp.asarray(positions),
    )


@functools.cache
def _attention(backend: str, sliding_window: int | None = None, soft_cap: float | None = None):
    kw = {"sm_scale": SM_SCALE, "sliding_window": sliding_window, "soft_cap": soft_cap}
    return jax.jit(lambda *a: ops.attention(*a, Numerics(backend=backend), **kw))


def _reference(*args, sliding_window=None, soft_cap=None):
    kw = {"sm_scale": SM_SCALE, "sliding_window": sliding_window, "soft_cap": soft_cap}
    return rpa.reference(*args, **kw)


CASES = [  # page sizes 4/8/16, GQA 1/2/4/8, head_dim 64/128, fp32/bf16, window, soft cap
    {"page_size": 4, "group": 1, "head_dim": 64, "dtype": jnp.float32},
    {"page_size": 8, "group": 2, "head_dim": 128, "dtype": jnp.bfloat16},
    {"page_size": 16, "group": 4, "head_dim": 64, "dtype": jnp.float32, "sliding_window": 40},
    {"page_size": 8, "group": 8, "head_dim": 64, "dtype": jnp.bfloat16, "soft_cap": 20.0},
    {"page_size": 16, "group": 8, "head_dim": 128, "dtype": jnp.float32},
    {"page_size": 4, "group": 4, "head_dim": 128, "dtype": jnp.bfloat16, "sliding_window": 70},
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: "-".join(f"{k}={getattr(v, '__name__', v)}" for k, v in c.items())
)
def test_matches_reference_on_a_mixed_batch(case, backend):
    case = dict(case)
    page_size, dtype = case.pop("page_size"), case.pop("dtype")
    group, head_dim = case.pop("group"), case.pop("head_dim")
    tokens = FEW if backend == "tpu_interpret" else MIXED
    args = assemble(
        make_content(0, group=group, head_dim=head_dim), tokens, page_size=page_size, dtype=dtype
    )
    out = _attention(backend, **case)(*args)
    assert out.dtype == dtype and out.shape == args[0].shape
    expected = _reference(*args, **case)
    assert_close(out, expected, dtype)
    padding = np.asarray(args[5]) < 0
    assert not np.any(np.asarray(out, np.float32)[padding])  # padding tokens give zeros


def _row(tokens, token) -> int:
    return tokens.index(token)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_token_is_bitwise_invariant(backend):
    """A token's output bits do not depend on its batch, its row, page placement, or on whether
    it was computed inside a prefill chunk (of any length) or as a decode step."""
    content = make_content(1, group=2, head_dim=64)
    build = functools.partial(assemble, content, page_size=8, dtype=jnp.bfloat16)
    attention = _attention(backend)
    full = attention(*build(MIXED))

    def output_of(token, tokens, **kw):
        return attention(*build(tokens, **kw))[_row(tokens, token)]

    probes = [(0, 149), (1, 107), (1, 127), (1, 128), (1, 130), (2, 0), (4, 63)]
    for token in probes:
        want = full[_row(MIXED, token)]
        assert_bitwise(output_of(token, [token]), want)  # alone
        # decode step: only the keys up to the token written, the rest of its pages still NaN
        written = tuple(token[1] + 1 if s == token[0] else n for s, n in enumerate(LENS))
        assert_bitwise(output_of(token, [token], written=written), want)
    # another batch size, every row moved, pages placed elsewhere
    moved = [PAD, *MIXED[::-1], (3, 50), PAD]
    out = attention(*build(moved, page_seed=7))
    for token in MIXED:
        assert_bitwise(out[_row(moved, token)], full[_row(MIXED, token)])
    # a shorter chunk of the same sequence
    chunk = [(1, p) for p in range(120, 131)]
    out = attention(*build(chunk, page_seed=3))
    for token in chunk:
        assert_bitwise(out[_row(chunk, token)], full[_row(MIXED, token)])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tpu_kernel_in_tpu_interpret_mode(dtype, capfd):
    """Few tokens (TPU interpret mode is slow): no races; a token is bitwise the same in another
    batch with other pages (pages past the keys written are NaN), as a decode step vs inside a
    chunk, and with the grid split over two simulated cores."""
    lens = (70, 6)
    content = make_content(2, group=2, head_dim=64, lens=lens)
    build = functools.partial(assemble, content, page_size=16, dtype=dtype, written=lens)
    attention = _attention("tpu_interpret")
    tokens = [(0, 69), (1, 4), (1, 5), PAD]
    out = attention(*build(tokens))
    moved = [(1, 5), PAD, (0, 69)]
    out_moved = attention(*build(moved, page_seed=5))
    for token in moved:
        assert_bitwise(out_moved[_row(moved, token)], out[_row(tokens, token)])
    decode = attention(*build([(1, 4)], written=(70, 5)))
    assert_bitwise(decode[0], out[_row(tokens, (1, 4))])
    two_cores = functools.partial(
        tpu_ragged_paged_attention.kernel, sm_scale=SM_SCALE, interpret=TPU_INTERPRET_2_CORES
    )
    assert_bitwise(jax.jit(two_cores)(*build(tokens)), out)
    assert_no_races(capfd)


# -- the KV block order, pinned exactly -----------------------------------------------------
# q = 0 makes every score 0, so every p is exactly 1 and every rescale factor alpha is exactly 1:
# the output of a token at position P is acc / (P + 1) with acc the fp32 sum of the values, taken
# one 64-key block at a time. Keys 0..63 hold 1.0 and later keys TINY = 1.5 * 2**-25, so a block
# of TINY values sums exactly to at most 64 * TINY = 0.375 ulp(64). In logical order acc is 64
# after block 0 and every later block rounds away: acc = 64 exactly. In any other order (blocks
# last-to-first, or block sums added together before block 0) the small blocks first add up to
# more than half an ulp of 64 and acc = fl(64 + 2**-17).
TINY = np.float32(1.5 * 2**-25)
ORDER_LEN = 192  # 3 KV blocks
ORDER_TOKENS = [(0, 189), (0, 190), (0, 191), PAD]  # a chunk ending on the 3rd block's last key


def _order_case(page_size: int):
    rng = np.random.default_rng(8)
    k = rng.standard_normal((1, ORDER_LEN, KV_HEADS, 16), np.float32)  # any finite keys
    v = np.where(np.arange(ORDER_LEN) < rpa.KV_BLOCK, np.float32(1), TINY).astype(np.float32)
    v = np.broadcast_to(v[None, :, None, None], k.shape).copy()
    q = np.zeros((1, ORDER_LEN, KV_HEADS * 2, 16), np.float32)
    args = assemble(Content(k, v, q), ORDER_TOKENS, page_size=page_size, dtype=jnp.float32,
                    written=(ORDER_LEN,), page_seed=4)  # fmt: skip
    want = np.zeros(args[0].shape, np.float32)
    for row, (_, pos) in enumerate(ORDER_TOKENS):
        if pos >= 0:
            want[row] = np.float32(64) / np.float32(pos + 1)
    return args, want


def _cpu_head_units(*args):
    return rpa.cpu_head_units(*args, unit=1, sm_scale=SM_SCALE)


LOWERINGS = {
    "cpu": _attention("cpu"),
    "cpu_head_units": jax.jit(_cpu_head_units),
    "cpu_column_blocks": jax.jit(  # ops' own route to the head-unit lowering
        lambda *a: ops.attention(*a, Numerics(backend="cpu", column_blocks=2), sm_scale=SM_SCALE)
    ),
    "pallas_interpret": _attention("pallas_interpret"),
    "tpu_interpret": _attention("tpu_interpret"),
}


@pytest.mark.parametrize("page_size", [16, 128])  # a block spans pages / lies inside one page
@pytest.mark.parametrize("lowering", LOWERINGS)
def test_kv_blocks_are_reduced_in_logical_order(lowering, page_size):
    """Pins the documented reduction order exactly, for every lowering: 64-key blocks visited
    first to last with an fp32 online softmax. The construction above makes the logical-order
    result exactly 64 / (P + 1) and every other order 1 ulp(64) more; an invariance test cannot
    see a wrong order (prefill and decode would both be wrong the same way), this one does."""
    args, want = _order_case(page_size)
    out = np.asarray(LOWERINGS[lowering](*args))
    wrong = np.float32(np.float32(64) + np.float32(2**-17)) / np.float32(192)
    assert not np.any(out[2].view(np.uint32) == wrong.view(np.uint32)), "KV blocks out of order"
    assert np.array_equal(out.view(np.uint32), want.view(np.uint32)), (out[:3, 0, 0], want[:3, 0])


@pytest.mark.parametrize(
    "platform,name,calls",
    [("tpu", "tpu_ragged_paged_attention", "mosaic_tpu"), ("cuda", "ragged_paged_attention", "triton")],
)
def test_pallas_backend_lowers_the_platforms_kernel(platform, name, calls):
    """One traced `Numerics(backend="pallas")` attention: the TPU kernel when lowered for TPU, the
    generic kernel through Triton for CUDA (the machine tracing it is a CPU)."""
    args = assemble(make_content(3, group=2, head_dim=64), [(0, 5)], page_size=8, dtype=jnp.float32)
    attention = lambda *a: ops.attention(*a, Numerics(backend="pallas"), sm_scale=SM_SCALE)  # noqa: E731
    mlir = lower_for(platform, attention, *args)
    assert kernel_calls(mlir) == {"triton": 0, "mosaic_tpu": 0, "mosaic_gpu": 0} | {calls: 1}
    assert f'"{name}"' in mlir


@pytest.mark.parametrize("window_and_cap", [(None, None), (40, 20.0)])
def test_reference_agrees_with_jax_ref_ragged_paged_attention(window_and_cap):
    """JAX's reference takes sequences in order, queries = the last q_len positions of kv_len,
    and K/V interleaved on one head axis (K at even, V at odd heads)."""
    sliding_window, soft_cap = window_and_cap
    content = make_content(4, group=2, head_dim=128)
    q_lens = (1, 24, 3, 1, 4)
    tokens = [(s, p) for s, (n, q_len) in enumerate(zip(LENS, q_lens)) for p in range(n - q_len, n)]
    args = assemble(content, tokens, page_size=8, dtype=jnp.float32)
    q, k_pages, v_pages, table, _, _ = args
    kv_pages = jnp.stack([k_pages, v_pages], axis=3).reshape(*k_pages.shape[:2], 2 * KV_HEADS, -1)
    # its per-sequence Python loop needs concrete lengths: close over them and jit the rest
    theirs = jax.jit(
        lambda q, kv_pages, table: jax_rpa.ref_ragged_paged_attention(
            q,
            kv_pages,
            np.asarray(LENS, np.int32),
            table,
            np.cumsum((0, *q_lens), dtype=np.int32),
            np.asarray([len(LENS)], np.int32),
            sm_scale=SM_SCALE,
            sliding_window=sliding_window,
            soft_cap=soft_cap,
        )
    )(q, kv_pages, table)
    assert_close(
        _reference(*args, sliding_window=sliding_window, soft_cap=soft_cap), theirs, jnp.float32
    )


def torch_attention(q, k_pages, v_pages, page_table, seq_ids, positions, *, sliding_window=None,
                    soft_cap=None):  # fmt: skip
    """From scratch in torch: each token gathers its visible keys position by position through
    its page-table row and takes a plain softmax per query head (padding tokens give zeros)."""
    page_size, kv_heads = k_pages.shape[1], k_pages.shape[2]
    group = q.shape[1] // kv_heads
    k_flat = k_pages.reshape(-1, kv_heads, k_pages.shape[-1])
    v_flat = v_pages.reshape(-1, kv_heads, v_pages.shape[-1])
    outs = []
    for t, (s, pos) in enumerate(zip(seq_ids.tolist(), positions.tolist())):
        if s < 0 or pos < 0:
            outs.append(torch.zeros_like(q[t]))
            continue
        first = 0 if sliding_window is None else max(0, pos - sliding_window + 1)
        keys = torch.arange(first, pos + 1)
        row = torch.tensor(page_table[s].tolist())
        slots = row[keys // page_size] * page_size + keys % page_size
        heads = []
        for h in range(q.shape[1]):
            k, v = k_flat[slots, h // group], v_flat[slots, h // group]  # [keys, D]
            scores = (k @ q[t, h]) * SM_SCALE
            if soft_cap is not None:
                scores = soft_cap * torch.tanh(scores / soft_cap)
            heads.append(torch.softmax(scores, dim=0) @ v)
        outs.append(torch.stack(heads))
    return torch.stack(outs)


GRAD_NUMERICS = {
    "cpu": Numerics(backend="cpu"),
    "cpu_column_blocks": Numerics(backend="cpu", column_blocks=2),
    "pallas_interpret": Numerics(backend="pallas_interpret"),
}


@pytest.mark.parametrize("window_and_cap", [(None, None), (40, 20.0)])
@pytest.mark.parametrize("numerics", GRAD_NUMERICS)
def test_gradient_matches_torch_autograd(numerics, window_and_cap):
    """The op's gradient in q, k_pages and v_pages (a custom_vjp) against torch autograd in
    float64 through `torch_attention`, an independent from-scratch attention over the gathered
    pages: a wrong backward (scaled, or the gradient of another function) fails."""
    sliding_window, soft_cap = window_and_cap
    args = assemble(make_content(5, group=2, head_dim=64), MIXED, page_size=8, dtype=jnp.float32)
    q, k_pages, v_pages, *meta = (jnp.nan_to_num(a) for a in args)  # NaN * 0 would poison dq
    c = np.random.default_rng(6).standard_normal(q.shape, np.float32)
    kw = {"sm_scale": SM_SCALE, "sliding_window": sliding_window, "soft_cap": soft_cap}

    def loss(q, k, v):
        return jnp.sum(ops.attention(q, k, v, *meta, GRAD_NUMERICS[numerics], **kw) * c)

    got = jax.jit(jax.grad(loss, (0, 1, 2)))(q, k_pages, v_pages)
    tq, tk, tv = (torch.tensor(np.asarray(a), dtype=torch.float64, requires_grad=True)
                  for a in (q, k_pages, v_pages))  # fmt: skip
    out = torch_attention(tq, tk, tv, *(np.asarray(m) for m in meta),
                          sliding_window=sliding_window, soft_cap=soft_cap)  # fmt: skip
    (out * torch.tensor(c, dtype=torch.float64)).sum().backward()
    for g, want in zip(got, (tq.grad, tk.grad, tv.grad), strict=True):
        assert_close(g, want.numpy(), jnp.float32)


def test_kernels_reject_mismatched_heads():
    args = assemble(make_content(6, group=2, head_dim=64), [(0, 5)], page_size=8, dtype=jnp.float32)
    with pytest.raises(ValueError, match="heads"):
        pallas_ragged_paged_attention.kernel(
            args[0][:, :3], *args[1:], sm_scale=SM_SCALE, interpret=True
        )


@pytest.mark.parametrize(
    "platform,module,target",
    [
        ("cuda", pallas_ragged_paged_attention, "xla.gpu.triton"),
        ("tpu", tpu_ragged_paged_attention, "tpu_custom_call"),
    ],
)
@pytest.mark.parametrize("page_size", [16, 128])  # a block spans pages / lies inside one page
def test_kernel_lowers_for_its_platform(platform, module, target, page_size):
    # SmolLM2-135M: 9 heads over 3 kv heads (group 3 is not a power of two), head_dim 64
    q = jnp.zeros((40, 9, 64), jnp.bfloat16)
    pages = jnp.zeros((50, page_size, 3, 64), jnp.bfloat16)
    meta = jnp.zeros((8, 12), jnp.int32), jnp.zeros((40,), jnp.int32), jnp.zeros((40,), jnp.int32)
    attention = functools.partial(
        module.kernel, sm_scale=SM_SCALE, sliding_window=100, soft_cap=30.0
    )
    assert target in lower_for(platform, attention, q, pages, pages, *meta)


# -- sliding windows: skipped blocks are exact no-ops ---------------------------------------------
# Every lowering starts its KV walk at `rpa.first_block`; with it pinned to 0 the same kernels
# visit every block from 0 and mask the ones outside the window instead of skipping them.

WINDOW_LOWERINGS = {
    "cpu": rpa.cpu,
    "pallas_interpret": functools.partial(pallas_ragged_paged_attention.kernel, interpret=True),
    "tpu_interpret": functools.partial(
        tpu_ragged_paged_attention.kernel, interpret=pallas_common.TPU_INTERPRET
    ),
}


def _lowered(name: str, window: int | None):
    """A freshly jitted lowering (no trace cache shared with another `first_block`)."""
    fn = functools.partial(WINDOW_LOWERINGS[name], sm_scale=SM_SCALE, sliding_window=window)
    return jax.jit(lambda *a: fn(*a))


def _tokens_across_the_window_edge(window: int):
    """Decode tokens far past the window, a prefill chunk straddling a KV block boundary, and a
    short prompt that the window does not cut, with padding between."""
    return [
        (0, 149),
        *[(1, p) for p in range(window - 3, window + 5)],
        PAD,
        *[(1, p) for p in range(120, 131)],
        (2, 2),
        (4, 63),
    ]


def test_first_block_is_the_first_block_a_window_sees():
    pos = jnp.asarray([0, 19, 63, 64, 149, 200], jnp.int32)
    assert list(rpa.first_block(pos, 20)) == [0, 0, 0, 0, 2, 2]  # keys 130.. and 181.. visible
    assert list(rpa.first_block(pos, 1)) == [0, 0, 0, 1, 2, 3]
    assert int(rpa.first_block(pos[4], None)) == 0
    first, end = pallas_ragged_paged_attention.block_range(jnp.int32(149), 20)
    assert (int(first), int(end)) == (2, 3)  # only the block holding keys 128..191 is walked


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [20, 64, 65])
def test_skipping_blocks_outside_the_window_changes_no_bit(monkeypatch, backend, window):
    content = make_content(7, group=2, head_dim=64)
    tokens = _tokens_across_the_window_edge(window)
    args = assemble(content, tokens, page_size=8, dtype=jnp.float32)
    skipped = _lowered(backend, window)(*args)
    assert_close(skipped, _reference(*args, sliding_window=window), jnp.float32)
    monkeypatch.setattr(rpa, "first_block", lambda pos, window: jnp.int32(0))
    masked = _lowered(backend, window)(*args)
    assert_bitwise(skipped, masked)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_window_longer_than_the_prompt_changes_no_bit(backend):
    content = make_content(8, group=2, head_dim=64)
    args = assemble(content, MIXED, page_size=8, dtype=jnp.bfloat16)
    assert_bitwise(_lowered(backend, max(LENS))(*args), _lowered(backend, None)(*args))


@pytest.mark.parametrize("backend", BACKENDS)
def test_windowed_token_is_bitwise_invariant(backend):
    """Under a 20-key window (pages of 8: windows cross pages and KV blocks), a token's bits do not
    depend on its batch, on page placement, or on whether it came in a chunk straddling the
    window's edge or as a decode step with only its prefix written."""
    window = 20
    content = make_content(9, group=2, head_dim=64)
    build = functools.partial(assemble, content, page_size=8, dtype=jnp.bfloat16)
    attention = _lowered(backend, window)
    tokens = _tokens_across_the_window_edge(window)
    full = attention(*build(tokens))
    for token in [(0, 149), (1, window - 3), (1, window), (1, window + 4), (1, 128), (2, 2)]:
        want = full[_row(tokens, token)]
        written = tuple(token[1] + 1 if s == token[0] else n for s, n in enumerate(LENS))
        assert_bitwise(attention(*build([token], written=written, page_seed=4))[0], want)
    chunk = [(1, p) for p in range(window - 1, window + 3)]  # a chunk starting on the edge
    out = attention(*build([PAD, *chunk], page_seed=2))
    for i, token in enumerate(chunk):
        assert_bitwise(out[i + 1], full[_row(tokens, token)])


def test_tpu_kernel_skips_blocks_outside_the_window(monkeypatch):
    """TPU interpret mode (slow: tiny): matches the reference under a window, and skipping the
    blocks before the window is bitwise the same as visiting and masking them."""
    lens, window = (150, 6), 20
    content = make_content(10, group=2, head_dim=64, lens=lens)
    tokens = [(0, 149), (0, 84), (1, 5), PAD]
    args = assemble(content, tokens, page_size=16, dtype=jnp.float32, written=lens)

    def run():
        return WINDOW_LOWERINGS["tpu_interpret"](*args, sm_scale=SM_SCALE, sliding_window=window)

    skipped = run()
    assert_close(skipped, _reference(*args, sliding_window=window), jnp.float32)
    monkeypatch.setattr(rpa, "first_block", lambda pos, window: jnp.int32(0))
    assert_bitwise(skipped, run())


# Every query tile in use: a batch under Q_TILE rows runs one tile of 1, 2, 4 or 8 rows where
# that tile gives the Q_TILE tile's bits for the shape (checked when a step is traced).
SMALL_Q_BATCHES = [(1, 0), (2, 1), (3, 2), (4, 0), (5, 4), (8, 7), (9, 3), (15, 14), (16, 0), (17, 16)]


@pytest.mark.parametrize(
    "group,head_dim,page_size,dtype,window,cap",
    [
        (3, 64, 16, jnp.float32, None, None),  # SmolLM2-135M: 9 heads over 3 KV heads
        (4, 256, 16, jnp.bfloat16, 100, None),  # Gemma-3: 4 heads over 1 KV head of 256, window
        (2, 64, 8, jnp.float32, None, 20.0),  # soft-capped scores
    ],
)
def test_every_query_tile_gives_the_q_tile_bits(group, head_dim, page_size, dtype, window, cap):
    """A decode token's bits are those of the token in a full Q_TILE tile, whatever the number of
    tokens (and so the query tile) of its batch, and wherever it sits in the batch."""
    content = make_content(5, group=group, head_dim=head_dim)
    build = functools.partial(assemble, content, page_size=page_size, dtype=dtype)
    attention = _attention("cpu", window, cap)
    probe = (0, 149)  # three KV blocks, two of them past a window of 100
    others = [(s % len(LENS), LENS[s % len(LENS)] - 1 - s // len(LENS)) for s in range(1, 20)]
    full = others[: rpa.Q_TILE - 1]
    want = attention(*build([probe, *full]))[0]
    for rows, at in SMALL_Q_BATCHES:
        batch = others[: rows - 1]
        batch.insert(at, probe)
        assert_bitwise(attention(*build(batch, page_seed=rows))[at], want)


def test_small_query_tiles_only_where_they_give_the_q_tile_bits(monkeypatch):
    """A smaller query tile runs only when the check finds every row's bits equal to the Q_TILE
    tile's: a tile whose bits depend on its rows sends every batch to Q_TILE."""
    tiles = []
    real_tiles, real_tile = rpa._tiles, rpa._attend_tile

    def recording(*args, tile, **kw):
        tiles.append(tile)
        return real_tiles(*args, tile=tile, **kw)

    def run(rows):
        content = make_content(2, group=2, head_dim=16)
        args = assemble(content, [(0, 149)] * rows, page_size=8, dtype=jnp.float32)
        tiles.clear()
        rpa.cpu(*args, sm_scale=SM_SCALE)
        return tiles[-1]

    monkeypatch.setattr(rpa, "_tiles", recording)
    rpa.small_q_tiles_agree.cache_clear()
    try:
        assert [run(r) for r in (1, 3, 8, 16, 20)] == [1, 4, 8, 16, 16]
        tile_dependent = lambda q, *a, **kw: real_tile(q, *a, **kw) + q.shape[0] * 1e-3  # noqa: E731
        monkeypatch.setattr(rpa, "_attend_tile", tile_dependent)
        rpa.small_q_tiles_agree.cache_clear()
        assert [run(r) for r in (1, 3, 8, 16, 20)] == [rpa.Q_TILE] * 5
    finally:
        rpa.small_q_tiles_agree.cache_clear()
