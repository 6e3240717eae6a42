"""Processed logits, logprobs and sampling, row by row.

Semantics (vLLM V1's order, on fp32 logits):
  1. temperature: z = raw / T. T = 0 is greedy: the token is argmax(raw) and the processed
     distribution is the raw one (no filters).
  2. min-p: drop tokens whose probability under softmax(z) is below min_p * max probability.
  3. top-k: keep tokens whose value is >= the k-th largest surviving value (ties kept).
  4. top-p: over the survivors' renormalised probabilities, keep a token when the probability
     mass ranked strictly above it is below top_p (the smallest kept probability is the
     threshold; ties at it are kept). top_p = 1 keeps everything.
  Dropped tokens get -inf. The processed distribution is softmax(z) over the survivors.

Sampling is inverse-CDF on the processed distribution with one uniform draw per row from
`fold_in(key(seed), position)`: a function of the request's seed and the sampled token's position
only, so a request's draws never depend on its batch. The CDF is summed in a fixed order (blocks of
`CDF_BLOCK` tokens, then within the chosen block) and a token the filters dropped (probability 0)
is never chosen. One draw per row, not a Gumbel draw per vocabulary entry (BUILD.md has the
costs).

Everything per row runs inside one fixed `[ROW_TILE, vocab]` tile (`map_row_tiles`), and the engine
and `jengine.score` call the same `select` function: a rollout's logprob and the trainer-side
score of the same token are the same bits.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jengine import plan
from jengine.plan import SampleRows
from pallas_kernels.tiling import map_row_tiles

# The host layer's plan types are pytrees of arrays on the device side.
for _cls in (plan.SampleRows, plan.StepPlan):
    jax.tree_util.register_dataclass(
        _cls, data_fields=[f.name for f in dataclasses.fields(_cls)], meta_fields=[]
    )


def log_softmax(z: jax.Array) -> jax.Array:
    """f32[M, V] log-softmax over the last axis, max subtracted first; -inf entries stay -inf
    (a row must not be all -inf)."""
    z = z.astype(jnp.float32)
    m = jnp.max(z, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    lse = jnp.log(jnp.sum(jnp.exp(z - m), axis=-1, keepdims=True)) + m
    return z - lse


def _softmax(z: jax.Array) -> jax.Array:
    return jnp.exp(log_softmax(z))


# top-k and top-p thresholds by bisection over float bit patterns: 32 passes of a compare and a
# sum over the row instead of a full-vocabulary sort (slow on XLA:CPU; BUILD.md has the figures).


def _bits(x: jax.Array) -> jax.Array:
    """i32 bit patterns of non-negative f32 values: ordered as the values are."""
    return jax.lax.bitcast_convert_type(x, jnp.int32)


def _order_key(x: jax.Array) -> jax.Array:
    """u32 keys ordered exactly as the f32 values x (-inf included; no NaN)."""
    b = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(b >> 31 == 1, ~b, b | jnp.uint32(0x80000000))


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


def _top_p_threshold_bits(p: jax.Array, top_p: jax.Array) -> jax.Array:
    """i32[R, 1]: bits of the smallest x with (mass of the p[R, V] entries > x) < top_p.

    Keeping `p >= x` keeps exactly the tokens the rank rule keeps (the mass ranked strictly above
    a token is below top_p; ties with the smallest kept probability kept): that mass only grows as
    the token's probability falls. Each mass is summed in vocabulary order, so the rounding is
    monotone in x and a row's threshold depends on that row only.
    """
    p = jax.lax.stop_gradient(p)
    bits = _bits(p)

    def step(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = jnp.sum(jnp.where(bits > mid, p, 0.0), axis=-1, keepdims=True) < top_p[:, None]
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    bounds = (jnp.zeros_like(bits[:, :1]), jnp.max(bits, axis=-1, keepdims=True))
    return jax.lax.fori_loop(0, 32, step, bounds)[0]


def processed_logits(raw: jax.Array, rp: SampleRows) -> jax.Array:
    """f32[R, V] processed logits (see the module docstring); -inf where a filter dropped a token."""
    greedy = rp.temperature == 0.0
    temp = jnp.where(greedy, 1.0, rp.temperature)[:, None]
    z = raw / temp

    def min_p_filter(z: jax.Array) -> jax.Array:
        probs = _softmax(z)
        keep = probs >= rp.min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True)
        return jnp.where(keep, z, -jnp.inf)

    # Each filter runs only when a sampling row of the tile uses it; for the other rows the
    # filter keeps every token, so skipping it changes no bit. Greedy and padding rows ignore
    # filters (their processed logits are the raw ones).
    sampled = ~greedy
    z = jax.lax.cond(jnp.any(sampled & (rp.min_p > 0.0)), min_p_filter, lambda z: z, z)

    def filters(z: jax.Array) -> jax.Array:
        key = _order_key(z)
        kth = _kth_largest_key(key, rp.top_k)  # [R, 1]
        z = jnp.where((rp.top_k[:, None] > 0) & (key < kth), -jnp.inf, z)
        p = _softmax(z)
        threshold = _top_p_threshold_bits(p, rp.top_p)  # [R, 1]
        return jnp.where((rp.top_p[:, None] < 1.0) & (_bits(p) < threshold), -jnp.inf, z)

    needs_filters = jnp.any(sampled & ((rp.top_k > 0) | (rp.top_p < 1.0)))
    z = jax.lax.cond(needs_filters, filters, lambda z: z, z)
    return jnp.where(greedy[:, None], raw, z)


CDF_BLOCK = 256  # tokens per first-level CDF block; part of the sampling contract


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
    rows, vocab = z.shape
    num_blocks = -(-vocab // CDF_BLOCK)
    mass = jnp.exp(z - jnp.max(z, axis=-1, keepdims=True))  # unnormalised; dropped tokens 0
    mass = jnp.pad(mass, ((0, 0), (0, num_blocks * CDF_BLOCK - vocab)))
    mass = mass.reshape(rows, num_blocks, CDF_BLOCK)
    block_mass = jnp.sum(mass, axis=-1)  # [R, num_blocks]
    block_cdf = jnp.cumsum(block_mass, axis=-1)
    target = u * block_cdf[:, -1]
    block = jnp.minimum(jnp.sum(block_cdf <= target[:, None], axis=-1), _last_positive(block_mass))
    before = jnp.take_along_axis(block_cdf, jnp.maximum(block - 1, 0)[:, None], axis=-1)[:, 0]
    rest = target - jnp.where(block > 0, before, 0.0)
    in_block = jnp.take_along_axis(mass, block[:, None, None], axis=1)[:, 0]  # [R, CDF_BLOCK]
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


def _select_tile(raw: jax.Array, rp: SampleRows, logprobs_mode: str, top_n: int) -> Selected:
    raw = raw.astype(jnp.float32)
    finite = jnp.all(jnp.isfinite(raw), axis=-1)
    safe_raw = jnp.where(jnp.isfinite(raw), raw, 0.0)  # keep the tile well-defined; flagged anyway
    z = processed_logits(safe_raw, rp)
    values = {
        "processed_logprobs": lambda: log_softmax(z),
        "raw_logprobs": lambda: log_softmax(safe_raw),
        "processed_logits": lambda: z,
        "raw_logits": lambda: safe_raw,
    }[logprobs_mode]()
    greedy = rp.temperature == 0.0
    drawn = inverse_cdf(z, uniform_draw(rp.seed, rp.position))
    sampled = jnp.where(greedy, jnp.argmax(safe_raw, axis=-1), drawn)
    token = jnp.where(rp.use_target, rp.target, sampled).astype(jnp.int32)
    value = jnp.take_along_axis(values, token[:, None], axis=-1)[:, 0]
    if top_n:
        top_values, top_ids = jax.lax.top_k(values, top_n)
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
    return map_row_tiles(tile, raw, *fields, differentiable=True)
