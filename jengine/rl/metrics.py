"""Train/rollout mismatch metrics, defined the way RL trainers log them.

With r = logp_new - logp_old per token (masked), w = exp(r):
  ratio_mean, ratio_max      mean / max of w
  clip_frac_low / _high      fraction of tokens with w < 1 - eps_low / w > 1 + eps_high
  clip_frac                  their sum (PPO's clip indicator)
  k1                         mean(-r)          (verl's mismatch_kl with new=rollout, old=train)
  k3 (= kl_new_old)          mean(w - r - 1)   (the k3 estimator; >= 0)
  mean_abs_log_ratio         mean |r|
  max_abs_diff               max |r|           (TorchTitan's bit_wise/logprob_diff/max)
  ess                        (sum w)^2 / sum w^2, and ess_frac = ess / num_tokens
                             (verl's 1 / mean(w^2) when mean(w) = 1)
  bitwise_equal              tokens whose float32 bit patterns agree; num_tokens the mask count
  routing_mismatches         (mixture-of-experts, when both routings are given) tokens routed to
                             other experts in some sparse layer or rank
All are jnp scalars (jit-able); `to_host` turns the dict into Python floats/ints.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jengine.rl.corrections import _mask


def bitwise_equal(a: jax.Array, b: jax.Array, mask=None) -> jax.Array:
    """i32 count of masked entries whose float32 bit patterns are identical."""
    a32 = jax.lax.bitcast_convert_type(jnp.asarray(a, jnp.float32), jnp.uint32)
    b32 = jax.lax.bitcast_convert_type(jnp.asarray(b, jnp.float32), jnp.uint32)
    return jnp.sum((a32 == b32) & _mask(mask, a32)).astype(jnp.int32)


def routing_mismatches(routing_new: jax.Array, routing_old: jax.Array, mask=None) -> jax.Array:
    """i32 count of masked tokens whose expert ids [..., sparse layers, k] differ anywhere (e.g.
    `token_logprobs(..., return_routing=True)` against the rollout's `routed_experts`)."""
    a, b = jnp.asarray(routing_new), jnp.asarray(routing_old)
    if a.shape != b.shape:
        raise ValueError(f"routings of shapes {a.shape} and {b.shape} cannot be compared")
    differ = jnp.any(a != b, axis=(-2, -1))
    return jnp.sum(differ & _mask(mask, differ)).astype(jnp.int32)


def mismatch_metrics(logp_new: jax.Array, logp_old: jax.Array, mask=None, *, eps_low: float = 0.2,
                     eps_high: float = 0.2, routing_new: jax.Array | None = None,
                     routing_old: jax.Array | None = None) -> dict[str, jax.Array]:  # fmt: skip
    """Mismatch/ratio metrics of logp_new against logp_old over the masked tokens (see module);
    with both routings, `routing_mismatches` too."""
    logp_new = jnp.asarray(logp_new, jnp.float32)
    logp_old = jnp.asarray(logp_old, jnp.float32)
    m = _mask(mask, logp_new)
    n = jnp.sum(m.astype(jnp.float32))
    denom = jnp.maximum(n, 1.0)
    r = jnp.where(m, logp_new - logp_old, 0.0)
    w = jnp.where(m, jnp.exp(r), 0.0)

    def mean(x):
        return jnp.sum(jnp.where(m, x, 0.0)) / denom

    low = mean((w < 1.0 - eps_low).astype(jnp.float32))
    high = mean((w > 1.0 + eps_high).astype(jnp.float32))
    sum_w = jnp.sum(w)
    sum_w2 = jnp.sum(w * w)
    ess = jnp.where(sum_w2 > 0, sum_w * sum_w / jnp.where(sum_w2 > 0, sum_w2, 1.0), 0.0)
    k3 = mean(jnp.expm1(r) - r)  # = w - r - 1, with less cancellation near r = 0
    routing = {} if routing_new is None or routing_old is None else {
        "routing_mismatches": routing_mismatches(routing_new, routing_old, m)}  # fmt: skip
    return dict(
        **routing, ratio_mean=mean(w), ratio_max=jnp.max(jnp.where(m, w, -jnp.inf)),
        clip_frac_low=low, clip_frac_high=high, clip_frac=low + high, k1=mean(-r), k3=k3, kl_new_old=k3,
        mean_abs_log_ratio=mean(jnp.abs(r)), max_abs_diff=jnp.max(jnp.where(m, jnp.abs(r), 0.0)),
        ess=ess, ess_frac=ess / denom, bitwise_equal=bitwise_equal(logp_new, logp_old, m),
        num_tokens=n.astype(jnp.int32),
    )  # fmt: skip


def to_host(metrics: dict[str, jax.Array]) -> dict[str, float | int]:
    """Python numbers (ints for counts) from a metrics dict."""
    out = {}
    for k, v in metrics.items():
        v = np.asarray(jax.device_get(v))
        out[k] = int(v) if np.issubdtype(v.dtype, np.integer) else float(v)
    return out
