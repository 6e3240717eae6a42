"""Opt-in objective-side corrections for a train/rollout mismatch (never a substitute for parity).

Ratios are of the trainer's (old) policy over the rollout policy, per token or per sequence:
  token level:     w_t = exp(logp_train_t - logp_rollout_t)
  sequence level:  s   = exp(mean_t (logp_train_t - logp_rollout_t))  (GSPO's geometric ratio),
                   broadcast to the sequence's tokens.
  truncated IS (TIS):     weight = min(w, C)                  (C ~ 2 in verl / ms-swift, 3 in TRL)
  masked IS (MIS/IcePop): weight = w inside [lo, hi], 0 outside (prime-rl uses [0.2, 5]);
                          `keep_ratio=False` gives a 0/1 mask instead.
Weights carry no gradient (stop_gradient): they multiply a per-token loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jengine.config import check_choice

LEVELS = ("token", "sequence")


def _mask(mask, like):
    """bool mask shaped like `like`: `mask`, or all True when None."""
    if mask is None:
        return jnp.ones(jnp.shape(like), jnp.bool_)
    return jnp.asarray(mask).astype(jnp.bool_)


def log_ratios(logp_num: jax.Array, logp_den: jax.Array, mask=None) -> jax.Array:
    """f32[B, T] r = logp_num - logp_den, 0 outside the mask."""
    m = _mask(mask, logp_num)
    return jnp.where(m, jnp.asarray(logp_num, jnp.float32) - jnp.asarray(logp_den, jnp.float32), 0.0)


def token_ratios(logp_num, logp_den, mask=None) -> jax.Array:
    """f32[B, T] exp(r) per token (1 outside the mask)."""
    return jnp.exp(log_ratios(logp_num, logp_den, mask))


def sequence_log_ratios(logp_num, logp_den, mask=None) -> jax.Array:
    """f32[B] mean_t r_t over each row's masked tokens (0 for an empty row)."""
    m = _mask(mask, logp_num)
    r = log_ratios(logp_num, logp_den, m)
    n = jnp.sum(m, axis=-1)
    return jnp.sum(r, axis=-1) / jnp.maximum(n, 1)


def sequence_ratios(logp_num, logp_den, mask=None) -> jax.Array:
    """f32[B] GSPO's sequence ratio exp(mean_t r_t)."""
    return jnp.exp(sequence_log_ratios(logp_num, logp_den, mask))


def _ratios(logp_train, logp_rollout, mask, level: str) -> jax.Array:
    check_choice("level", level, LEVELS)
    m = _mask(mask, logp_train)
    if level == "token":
        w = token_ratios(logp_train, logp_rollout, m)
    else:
        w = jnp.broadcast_to(sequence_ratios(logp_train, logp_rollout, m)[:, None], m.shape)
    return w, m


def truncated_is(logp_train, logp_rollout, mask=None, *, cap: float = 2.0, level: str = "token"):
    """f32[B, T] TIS weights min(ratio, cap), 0 outside the mask, no gradient."""
    w, m = _ratios(logp_train, logp_rollout, mask, level)
    return jax.lax.stop_gradient(jnp.where(m, jnp.minimum(w, cap), 0.0))


def masked_is(logp_train, logp_rollout, mask=None, *, lo: float = 0.2, hi: float = 5.0,
              level: str = "token", keep_ratio: bool = True):  # fmt: skip
    """f32[B, T] MIS weights: the ratio (or 1 if not keep_ratio) inside [lo, hi], else 0."""
    w, m = _ratios(logp_train, logp_rollout, mask, level)
    inside = m & (w >= lo) & (w <= hi)
    kept = w if keep_ratio else jnp.ones_like(w)
    return jax.lax.stop_gradient(jnp.where(inside, kept, 0.0))
