"""Processed logits, logprobs and sampling, row by row.

Semantics (vLLM V1's order, on fp32 logits):
  1. temperature: z = raw * (1 / T) in f32 (XLA's form of raw / T, written out). T = 0 is
     greedy: the token is argmax(raw) and the processed distribution is the raw one (no filters).
  2. min-p: drop tokens whose probability under softmax(z) is below min_p * max probability,
     i.e. z < max(z) + log(min_p).
  3. top-k: keep tokens whose value is >= the k-th largest surviving value (ties kept).
  4. top-p: over the survivors' renormalised probabilities, keep a token when the probability
     mass ranked strictly above it is below top_p; every token whose value is at least the
     smallest kept token's is kept (ties kept). top_p = 1 keeps everything.
  Dropped tokens get -inf. The processed distribution is softmax(z) over the survivors.

Each filter keeps the tokens at or above a per-row threshold on z, so the three become one
threshold per row (`_filter_threshold`) and the processed row is never written out whole: the
row sums below read it twice (maximum, then block masses) and that is all.

Thresholds without sorting the vocabulary (XLA:CPU sorts [32, 49152] in ~300 ms): top-k and top-p
read the row's TOP_CANDIDATES largest processed logits (`_top_candidates`: block maxima, then
`lax.top_k` over the best blocks only, exact). The k-th largest value is the k-th candidate; the
top-p threshold is the smallest kept candidate, the mass ranked strictly above a candidate being
the sum, in descending order, of the larger candidates' probabilities. A row whose k or nucleus
does not fit the candidates falls back to bisection over float bit patterns (32 passes over the
row; the top-p mass then summed over the whole row), chosen by that row's own values only.

Row sums (the softmax normaliser and the CDF) are built from fixed blocks of CDF_BLOCK tokens:
block sums first, then the block sums, each a fixed tree (`tiling.tree_sum`): XLA's reduce changed
its order with the program (scoring, with no draw, merged the two sums into one). Sampling is
inverse-CDF on the processed distribution with one uniform draw per row from `fold_in(key(seed),
position)`: a function of the request's seed and the sampled token's position only, so a request's
draws never depend on its batch; the chosen block is then searched entry by entry, and a token the
filters dropped (probability 0) is never chosen. One draw per row, not a Gumbel draw per vocabulary
entry (BUILD.md has the costs).

Everything per row runs inside one fixed `[sample_tile(vocab), vocab]` tile (`map_row_tiles`), and
the engine and `jengine.score` call the same `select` function: a rollout's logprob and the
trainer-side score of the same token are the same bits.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jengine import plan
from jengine.plan import SampleRows
from pallas_kernels.tiling import map_row_tiles, tree_sum

# The host layer's plan types are pytrees of arrays on the device side.
for _cls in (plan.SampleRows, plan.StepPlan):
    jax.tree_util.register_dataclass(
        _cls, data_fields=[f.name for f in dataclasses.fields(_cls)], meta_fields=[]
    )

SAMPLE_TILE = 8  # rows per sampling tile (fewer for a large vocabulary, `sample_tile`)
_TILE_BYTES = 2 << 20  # a tile's rows, at most this many bytes, stay in cache between passes
CDF_BLOCK = 256  # tokens per block of the row sums (normaliser and CDF); part of the contract
TOP_CANDIDATES = 64  # largest logits per row that top-k / top-p read before falling back
_CANDIDATE_BLOCK = 32  # vocabulary entries per block whose maximum preselects candidates


def sample_tile(vocab: int) -> int:
    """Rows per sampling tile for a vocabulary of `vocab` entries; part of the sampling contract:
    SAMPLE_TILE, halved (down to 2) until a tile's f32 row is at most _TILE_BYTES."""
    rows = SAMPLE_TILE
    while rows > 2 and rows * vocab * 4 > _TILE_BYTES:
        rows //= 2
    return rows


def _blocks(z: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(m f32[M, 1], zb f32[M, B, CDF_BLOCK], block_mass f32[M, B]) of z[M, V]: the row maximum
    (0 for an all -inf row), z in B = ceil(V / CDF_BLOCK) blocks (the last one padded with -inf)
    and each block's sum of exp(z - m)."""
    rows, vocab = z.shape
    num_blocks = -(-vocab // CDF_BLOCK)
    m = jnp.max(z, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    zb = jnp.pad(z, ((0, 0), (0, num_blocks * CDF_BLOCK - vocab)), constant_values=-jnp.inf)
    zb = zb.reshape(rows, num_blocks, CDF_BLOCK)
    return m, zb, tree_sum(jnp.exp(zb - m[:, :, None]))


def _log_normalizer(m: jax.Array, block_mass: jax.Array) -> jax.Array:
    """f32[M, 1]: log(sum(exp(z))) from `_blocks`: the block sums summed, then the max added."""
    return jnp.log(tree_sum(block_mass))[:, None] + m


def log_softmax(z: jax.Array) -> jax.Array:
    """f32[M, V] log-softmax over the last axis, max subtracted first; -inf entries stay -inf
    (a row must not be all -inf)."""
    z = z.astype(jnp.float32)
    m, _, block_mass = _blocks(z)
    return z - _log_normalizer(m, block_mass)


def _bits(x: jax.Array) -> jax.Array:
    """i32 bit patterns of non-negative f32 values: ordered as the values are."""
    return jax.lax.bitcast_convert_type(x, jnp.int32)


def _order_key(x: jax.Array) -> jax.Array:
    """u32 keys ordered exactly as the f32 values x (-inf included; no NaN)."""
    b = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(b >> 31 == 1, ~b, b | jnp.uint32(0x80000000))


def _from_order_key(key: jax.Array) -> jax.Array:
    """The f32 values whose `_order_key` is `key` (its inverse)."""
    b = jnp.where(key >> 31 == 1, key & jnp.uint32(0x7FFFFFFF), ~key)
    return jax.lax.bitcast_convert_type(b, jnp.float32)


def _first_max_index(x: jax.Array) -> jax.Array:
    """i32[R]: argmax of x[R, V] (first index of the maximum; x has no NaN), without the slow
    variadic (value, index) reduction XLA:CPU lowers `argmax` to."""
    top = jnp.max(x, axis=-1, keepdims=True)
    return jnp.min(jnp.where(x == top, jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape[-1]), axis=-1)


def _top_candidates(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(f32[R, K] values, i32[R, K] indices): the K = min(TOP_CANDIDATES, V) largest entries of
    z[R, V] per row, in descending order of value, exactly.

    Exact because the K largest entries lie in the K blocks with the largest maxima: an entry
    outside them is <= the K-th largest block maximum, and those K blocks already hold K entries
    at least that large. `lax.top_k` then runs on K blocks instead of the whole row.
    """
    rows, vocab = z.shape
    k = min(TOP_CANDIDATES, vocab)
    block = max(1, min(_CANDIDATE_BLOCK, vocab // k))
    num_blocks = -(-vocab // block)
    zb = jnp.pad(z, ((0, 0), (0, num_blocks * block - vocab)), constant_values=-jnp.inf)
    zb = zb.reshape(rows, num_blocks, block)
    _, blocks = jax.lax.top_k(jnp.max(zb, axis=-1), k)  # [R, K]
    cand = jnp.take_along_axis(zb, blocks[:, :, None], axis=1).reshape(rows, k * block)
    values, at = jax.lax.top_k(cand, k)
    return values, jnp.take_along_axis(blocks, at // block, axis=1) * block + at % block


def _kth_largest_key(key: jax.Array, k: jax.Array) -> jax.Array:
    """u32[R, 1]: the k-th largest of key[R, V] per row (k clipped to [1, V]), exact."""
    k = jnp.clip(k, 1, key.shape[-1])[:, None]

    def step(_, bounds):
        lo, hi = bounds  # the answer lies in [lo, hi]
        mid = lo + (hi - lo) // 2 + (hi - lo) % 2
        ok = jnp.sum(key >= mid, axis=-1, keepdims=True) >= k
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    bounds = (jnp.min(key, axis=-1, keepdims=True), jnp.max(key, axis=-1, keepdims=True))
    return jax.lax.fori_loop(0, 32, step, bounds)[0]


def _kth_largest(z: jax.Array, k: jax.Array, cand: jax.Array, used: jax.Array) -> jax.Array:
    """f32[R, 1]: the k-th largest entry of z[R, V] per row (k clipped to [1, V]): candidate
    k when k <= K (cand: `_top_candidates` values), else bisection (only run if a `used` row
    needs it)."""
    k = jnp.clip(k, 1, z.shape[-1])
    fits = k <= cand.shape[-1]
    from_cand = jnp.take_along_axis(cand, jnp.minimum(k, cand.shape[-1])[:, None] - 1, axis=-1)

    def bisect(_):
        return _from_order_key(_kth_largest_key(_order_key(z), k))

    slow = jax.lax.cond(jnp.any(used & ~fits), bisect, lambda _: from_cand, None)
    return jnp.where(fits[:, None], from_cand, slow)


def _top_p_threshold_bits(p: jax.Array, top_p: jax.Array) -> jax.Array:
    """i32[R, 1]: bits of the smallest x with (mass of the p[R, V] entries > x) < top_p.

    Keeping `p >= x` keeps exactly the tokens the rank rule keeps (the mass ranked strictly above
    a token is below top_p; ties with the smallest kept probability kept): that mass only grows as
    the token's probability falls. Each mass is a fixed tree sum of non-negative terms, so the
    rounding is monotone in x and a row's threshold depends on that row only.
    """
    p = jax.lax.stop_gradient(p)
    bits = _bits(p)

    def step(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = tree_sum(jnp.where(bits > mid, p, 0.0))[:, None] < top_p[:, None]
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    bounds = (jnp.zeros_like(bits[:, :1]), jnp.max(bits, axis=-1, keepdims=True))
    return jax.lax.fori_loop(0, 32, step, bounds)[0]


def _top_p_threshold(z: jax.Array, cand: jax.Array, top_p: jax.Array, used: jax.Array) -> jax.Array:
    """f32[R, 1]: the smallest z[R, V] top-p keeps, from the candidates cand[R, K] (z's largest,
    descending). Rows whose nucleus runs past the candidates fall back to bisection on the whole
    row (only run if a `used` row needs it)."""
    m, _, block_mass = _blocks(z)
    lse = _log_normalizer(m, block_mass)
    pc = jnp.exp(cand - lse)  # the candidates' probabilities, non-increasing
    cum = jnp.cumsum(pc, axis=-1)
    exclusive = jnp.concatenate([jnp.zeros_like(cum[:, :1]), cum[:, :-1]], axis=-1)
    first = jnp.concatenate([jnp.ones_like(pc[:, :1], bool), pc[:, 1:] != pc[:, :-1]], axis=-1)
    tie_start = jax.lax.cummax(jnp.where(first, jnp.arange(pc.shape[-1]), 0), axis=1)
    kept = jnp.take_along_axis(exclusive, tie_start, axis=-1) < top_p[:, None]  # a prefix
    smallest = jnp.take_along_axis(cand, jnp.sum(kept, axis=-1, keepdims=True) - 1, axis=-1)
    fits = ~kept[:, -1] | (pc[:, -1] == 0.0)  # the last candidate is dropped, or all after are 0

    def bisect(_):
        p = jnp.exp(z - lse)
        kept = _bits(p) >= _top_p_threshold_bits(p, top_p)
        return jnp.min(jnp.where(kept, z, jnp.inf), axis=-1, keepdims=True)

    slow = jax.lax.cond(jnp.any(used & ~fits), bisect, lambda _: smallest, None)
    return jnp.where(fits[:, None], smallest, slow)


def _filter_threshold(raw: jax.Array, inv_temp: jax.Array, rp: SampleRows) -> jax.Array:
    """f32[R, 1]: the smallest processed logit z = raw * inv_temp each row keeps (-inf: all).

    min-p, top-k and top-p each keep the tokens at or above a threshold computed on the previous
    filters' survivors, so together they keep z >= the largest of the three. Top-k and top-p run
    only when a sampling row of the tile uses them; for the other rows they keep every token, so
    skipping them changes no bit. (z is recomputed from raw where needed rather than passed
    around: a whole row written out costs more than the division.)
    """
    sampled = rp.temperature != 0.0
    use_min_p, use_k = sampled & (rp.min_p > 0.0), sampled & (rp.top_k > 0)
    use_p = sampled & (rp.top_p < 1.0)
    none = jnp.full((raw.shape[0], 1), -jnp.inf, jnp.float32)
    log_min_p = jnp.log(jnp.where(use_min_p, rp.min_p, 1.0))[:, None]
    z_max = jnp.max(raw * inv_temp, axis=-1, keepdims=True)
    threshold = jnp.where(use_min_p[:, None], z_max + log_min_p, none)

    def top_k_top_p(raw: jax.Array, threshold: jax.Array) -> jax.Array:
        z = raw * inv_temp
        z = jnp.where(z < threshold, -jnp.inf, z)
        cand, _ = _top_candidates(z)
        kth = jnp.where(use_k[:, None], _kth_largest(z, rp.top_k, cand, use_k), none)
        z, cand = jnp.where(z < kth, -jnp.inf, z), jnp.where(cand < kth, -jnp.inf, cand)
        top_p = jax.lax.cond(
            jnp.any(use_p), lambda z: _top_p_threshold(z, cand, rp.top_p, use_p), lambda z: none, z
        )
        return jnp.maximum(kth, jnp.where(use_p[:, None], top_p, none))

    later = jax.lax.cond(
        jnp.any(use_k | use_p), top_k_top_p, lambda raw, t: none, raw, threshold
    )
    return jnp.maximum(threshold, later)


def processed_logits(raw: jax.Array, rp: SampleRows) -> jax.Array:
    """f32[R, V] processed logits (see the module docstring); -inf where a filter dropped a token.
    A non-finite raw logit counts as 0 (the step reports the row as not finite)."""
    return _processed(_finite(raw), rp)


def _finite(raw: jax.Array) -> jax.Array:
    """raw with every non-finite entry replaced by 0 (keeps a tile well-defined; flagged anyway)."""
    return jnp.where(jnp.isfinite(raw), raw, 0.0)


def _processed(raw: jax.Array, rp: SampleRows) -> jax.Array:
    """`processed_logits` of an all-finite raw."""
    greedy = rp.temperature == 0.0
    inv_temp = (1.0 / jnp.where(greedy, 1.0, rp.temperature))[:, None]
    threshold = _filter_threshold(raw, inv_temp, rp)
    z = raw * inv_temp
    z = jnp.where(z < threshold, -jnp.inf, z)
    return jnp.where(greedy[:, None], raw, z)  # greedy and padding rows: the raw logits


def uniform_draw(seed: jax.Array, position: jax.Array) -> jax.Array:
    """f32[R] in [0, 1), row r a function of (seed[r], position[r]) only."""

    def one(s, p):
        key = jax.random.fold_in(jax.random.key(s, impl="threefry2x32"), p)
        return jax.random.uniform(key, (), jnp.float32)

    return jax.vmap(one)(seed, position)


def _last_positive(mass: jax.Array) -> jax.Array:
    """i32[R]: index of the last entry of mass[R, N] that is > 0 (0 when none is)."""
    return jnp.max(jnp.where(mass > 0, jnp.arange(mass.shape[-1]), 0), axis=-1)


def inverse_cdf(z: jax.Array, u: jax.Array) -> jax.Array:
    """i32[R]: per row, the first token whose cumulative probability under softmax(z) exceeds u.

    z: f32[R, V] processed logits (-inf = dropped), u: f32[R] in [0, 1). Two levels, each summed
    in a fixed order for a given V: CDF_BLOCK-token block masses, then the chosen block's entries.
    Where rounding leaves the target at or past a level's total, the last entry with positive mass
    is taken, so a dropped token is never returned.
    """
    return _draw(*_blocks(z), u)


def _draw(m: jax.Array, zb: jax.Array, block_mass: jax.Array, u: jax.Array) -> jax.Array:
    """`inverse_cdf` from `_blocks(z)`; only the chosen block's masses are computed again."""
    block_cdf = jnp.cumsum(block_mass, axis=-1)
    target = u * block_cdf[:, -1]
    block = jnp.minimum(jnp.sum(block_cdf <= target[:, None], axis=-1), _last_positive(block_mass))
    before = jnp.take_along_axis(block_cdf, jnp.maximum(block - 1, 0)[:, None], axis=-1)[:, 0]
    rest = target - jnp.where(block > 0, before, 0.0)
    in_block = jnp.exp(jnp.take_along_axis(zb, block[:, None, None], axis=1)[:, 0] - m)
    cdf = jnp.cumsum(in_block, axis=-1)
    index = jnp.minimum(jnp.sum(cdf <= rest[:, None], axis=-1), _last_positive(in_block))
    return (block * CDF_BLOCK + index).astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Selected:
    """What `select` returns per row ([R] unless noted)."""

    token: jax.Array  # i32, sampled (or the target when scoring)
    value: jax.Array  # f32, the token's number under `logprobs_mode`
    finite: jax.Array  # bool, every raw logit finite
    top_ids: jax.Array  # i32[R, n]
    top_values: jax.Array  # f32[R, n]
    routing: jax.Array | None = None  # i32[R, sparse layers, k]: the row's experts (when asked)


def _select_tile(raw: jax.Array, rp: SampleRows, logprobs_mode: str, top_n: int) -> Selected:
    raw = raw.astype(jnp.float32)
    finite = jnp.all(jnp.isfinite(raw), axis=-1)
    safe_raw = _finite(raw)
    z = _processed(safe_raw, rp)
    greedy = rp.temperature == 0.0
    m, zb, block_mass = _blocks(z)
    drawn = _draw(m, zb, block_mass, uniform_draw(rp.seed, rp.position))
    argmax = jax.lax.cond(
        jnp.any(greedy),
        _first_max_index,
        lambda raw: jnp.zeros(raw.shape[:1], jnp.int32),
        safe_raw,
    )
    token = jnp.where(rp.use_target, rp.target, jnp.where(greedy, argmax, drawn)).astype(jnp.int32)
    # the value under `logprobs_mode`: log_softmax(source)[token], computed as source[token] - lse
    # (the same subtraction, without writing the whole row), or source[token]
    source = safe_raw if logprobs_mode.startswith("raw") else z
    lse = None
    if logprobs_mode.endswith("logprobs"):
        sums = (m, block_mass) if source is z else _blocks(source)[::2]
        lse = _log_normalizer(*sums)
    value = jnp.take_along_axis(source, token[:, None], axis=-1)
    value = (value if lse is None else value - lse)[:, 0]
    if top_n:
        top_values, top_ids = jax.lax.top_k(source if lse is None else source - lse, top_n)
    else:
        top_values = jnp.zeros((raw.shape[0], 0), jnp.float32)
        top_ids = jnp.zeros((raw.shape[0], 0), jnp.int32)
    return Selected(token, value, finite, top_ids.astype(jnp.int32), top_values)


def select(raw: jax.Array, rp: SampleRows, logprobs_mode: str, top_n: int = 0) -> Selected:
    """Samples (or scores `rp.target`) every row of raw f32[R, V], one fixed tile at a time.

    `logprobs_mode` and `top_n` are static. Row r's outputs depend only on raw[r] and rp[r].
    """

    def tile(raw_t, *fields):
        return _select_tile(raw_t, SampleRows(*fields), logprobs_mode, top_n)

    fields = [getattr(rp, f.name) for f in dataclasses.fields(SampleRows)]
    return map_row_tiles(tile, raw, *fields, tile=sample_tile(raw.shape[-1]), differentiable=True)
