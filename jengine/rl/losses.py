"""GRPO / GSPO policy losses with group-normalised advantages.

  group_advantages(rewards[N, G]) = (r - mean_g r) / (std_g r + eps)   (per prompt group)
  GRPO (token level):  L = -sum_t m_t c_t min(w_t A, clip(w_t, 1-eps_low, 1+eps_high) A) / sum m
  GSPO (sequence):     s_i = exp(mean_t (logp_t - logp_old_t)),
                       L = -mean_i min(s_i A_i, clip(s_i, 1-eps_low, 1+eps_high) A_i)
                       (paper's eps ~ 3e-4 / 4e-4; `length_weighted` weights rows by length,
                       as PipelineRL does)
  `is_weights` (e.g. `corrections.truncated_is`) multiply each token's (or, averaged per row,
  each sequence's) term. `kl_coef` > 0 adds the k3 estimator against `logp_ref`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def group_advantages(rewards: jax.Array, eps: float = 1e-6, normalize_std: bool = True) -> jax.Array:
    """f32[N, G] advantages of rewards f32[N, G] (N prompt groups of G samples)."""
    r = jnp.asarray(rewards, jnp.float32)
    a = r - jnp.mean(r, axis=-1, keepdims=True)
    if normalize_std:
        a = a / (jnp.std(r, axis=-1, keepdims=True) + eps)
    return a


def _clip_obj(ratio, adv, eps_low, eps_high):
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    return jnp.minimum(ratio * adv, clipped * adv)


def grpo_loss(logp: jax.Array, logp_old: jax.Array, advantages: jax.Array, mask: jax.Array, *,
              eps_low: float = 0.2, eps_high: float = 0.2, is_weights: jax.Array | None = None,
              kl_coef: float = 0.0, logp_ref: jax.Array | None = None,
              ) -> tuple[jax.Array, dict[str, jax.Array]]:  # fmt: skip
    """Token-level clipped objective. logp/logp_old/mask: [B, T]; advantages: [B] (one per row).

    Returns (loss, aux) with aux['ratio'] f32[B, T] and aux['clipped'] (fraction of masked
    tokens where the clipped branch is active).
    """
    m = jnp.asarray(mask).astype(jnp.float32)
    r = jnp.where(m > 0, logp - jax.lax.stop_gradient(logp_old), 0.0)
    ratio = jnp.exp(r)
    adv = jnp.asarray(advantages, jnp.float32)[:, None]
    obj = _clip_obj(ratio, adv, eps_low, eps_high)
    if is_weights is not None:
        obj = obj * jax.lax.stop_gradient(is_weights)
    n = jnp.maximum(jnp.sum(m), 1.0)
    loss = -jnp.sum(obj * m) / n
    if kl_coef:
        if logp_ref is None:
            raise ValueError("kl_coef > 0 needs logp_ref")
        rr = jnp.where(m > 0, jax.lax.stop_gradient(logp_ref) - logp, 0.0)
        loss = loss + kl_coef * jnp.sum((jnp.exp(rr) - rr - 1.0) * m) / n
    active = ((adv > 0) & (ratio > 1.0 + eps_high)) | ((adv < 0) & (ratio < 1.0 - eps_low))
    clipped = jnp.sum(jnp.where(m > 0, active, False)) / n
    return loss, {"ratio": ratio, "clipped": clipped}


def gspo_loss(logp: jax.Array, logp_old: jax.Array, advantages: jax.Array, mask: jax.Array, *,
              eps_low: float = 3e-4, eps_high: float = 4e-4, is_weights: jax.Array | None = None,
              length_weighted: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:  # fmt: skip
    """Sequence-level clipped objective (GSPO). Shapes as in `grpo_loss`.

    `is_weights` [B, T] are averaged over each row's tokens into one weight per sequence.
    """
    m = jnp.asarray(mask).astype(jnp.float32)
    n_t = jnp.sum(m, axis=-1)
    r = jnp.where(m > 0, logp - jax.lax.stop_gradient(logp_old), 0.0)
    s = jnp.exp(jnp.sum(r, axis=-1) / jnp.maximum(n_t, 1.0))
    adv = jnp.asarray(advantages, jnp.float32)
    obj = _clip_obj(s, adv, eps_low, eps_high)
    if is_weights is not None:
        w = jnp.sum(jax.lax.stop_gradient(is_weights) * m, axis=-1) / jnp.maximum(n_t, 1.0)
        obj = obj * w
    row = (n_t > 0).astype(jnp.float32)
    weight = row * (n_t if length_weighted else 1.0)
    loss = -jnp.sum(obj * weight) / jnp.maximum(jnp.sum(weight), 1.0)
    clipped_rows = (s < 1.0 - eps_low) | (s > 1.0 + eps_high)
    return loss, {"ratio": s, "clipped": jnp.sum(clipped_rows * row) / jnp.maximum(jnp.sum(row), 1.0)}
