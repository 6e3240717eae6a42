"""Differentiable, batched trainer-side logprobs that are bitwise the engine's rollout logprobs.

`token_logprobs(params, config, tokens[B, L], prompt_lens[B], completion_lens[B])` runs the same
`models.transformer.forward` and `sampling.select` (with the tokens as targets) that the engine's
compiled step runs, over a fixed layout: sequence b's KV pages are the static range
`b * P .. b * P + P - 1` (P = ceil(L / page_size)), every token of every row is computed, and
the logit rows are all positions but the last. Every op is row-invariant, so the value of a
completion token equals the engine's logprob of that token, bit for bit, when the settings
(`logprobs_mode`, `lm_head_dtype`, `numerics`, sampling filters) match the engine's.

Alignment: output column t holds the number of `tokens[:, t + 1]` given `tokens[:, : t + 1]`,
so the output is f32[B, L - 1]; `completion_mask` says which columns are completion tokens.
Columns outside the mask hold 0.0 (never -inf or NaN, so masked losses have finite gradients).

Differentiable w.r.t. params: every invariant op is a `jax.custom_vjp` whose backward pass is the
plain-JAX reference (`pallas_kernels.ops`), so `jax.grad` gives ordinary gradients; with
numerics="fast" the whole computation is plain XLA (the reference implementation).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jengine import sampling
from jengine.config import ModelConfig, SamplingParams, check_numerics_settings
from jengine.models.transformer import Batch, Params, empty_kv_cache, forward
from pallas_kernels.ops import Numerics, default_backend

DEFAULT_PAGE_SIZE = 16  # any page size gives the same bits; this one keeps the page table short
PAD_MULTIPLE = 32  # flat token / logit-row counts are padded to a multiple of this


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def completion_mask(prompt_lens: jax.Array, completion_lens: jax.Array, length: int) -> jax.Array:
    """bool[B, length - 1]: column t is a completion token (`tokens[:, t + 1]` is generated)."""
    t = jnp.arange(1, length, dtype=jnp.int32)[None, :]  # the target's position
    p = jnp.asarray(prompt_lens, jnp.int32)[:, None]
    c = jnp.asarray(completion_lens, jnp.int32)[:, None]
    return (t >= p) & (t < p + c)


def sampling_arrays(
    sampling_params: SamplingParams | Sequence[SamplingParams] | None,
    batch: int,
) -> dict[str, np.ndarray]:
    """Per-sequence temperature/top_k/top_p/min_p arrays (numpy) from SamplingParams.

    None means temperature 1 with no filters (the raw distribution).
    """
    if sampling_params is None:
        sampling_params = SamplingParams()
    if isinstance(sampling_params, SamplingParams):
        per_seq = [sampling_params] * batch
    else:
        per_seq = list(sampling_params)
        if len(per_seq) != batch or not all(isinstance(s, SamplingParams) for s in per_seq):
            raise ValueError(f"sampling_params must be one SamplingParams or {batch} of them")
    return dict(
        temperature=np.asarray([s.temperature for s in per_seq], np.float32),
        top_k=np.asarray([s.top_k for s in per_seq], np.int32),
        top_p=np.asarray([s.top_p for s in per_seq], np.float32),
        min_p=np.asarray([s.min_p for s in per_seq], np.float32),
    )


def _per_seq(value: Any, default: float, dtype: Any, batch: int) -> jax.Array:
    if value is None:
        value = default
    return jnp.broadcast_to(jnp.asarray(value, dtype), (batch,))


def fixed_layout(batch: int, length: int, page_size: int) -> tuple[Batch, int]:
    """The Batch of a [batch, length] token block with static pages (tokens left zero).

    Returns (batch, num_pages). Everything but the tokens is a constant of the static shapes
    (numpy), so it traces under jit and the ops' custom_vjp closures see constants, not tracers.
    """
    pages = -(-length // page_size)
    t = np.arange(length, dtype=np.int32)
    b = np.arange(batch, dtype=np.int32)
    positions = np.broadcast_to(t[None, :], (batch, length)).reshape(-1)
    seq_ids = np.repeat(b, length)
    # page of (b, pos) is b * pages + pos // page_size, so its slot is b * pages * page_size + pos
    slots = seq_ids * (pages * page_size) + positions
    page_table = b[:, None] * pages + np.arange(pages, dtype=np.int32)[None, :]
    logit_rows = (b[:, None] * length + t[None, : length - 1]).reshape(-1)
    layout = Batch(
        tokens=np.zeros((batch * length,), np.int32),
        positions=positions.astype(np.int32),
        seq_ids=seq_ids.astype(np.int32),
        slots=slots.astype(np.int32),
        page_table=page_table.astype(np.int32),
        logit_rows=logit_rows.astype(np.int32),
    )
    return layout, batch * pages


def _row_params(tokens: jax.Array, temperature, top_k, top_p, min_p) -> sampling.RowParams:
    batch, length = tokens.shape
    n = length - 1

    def rows(x):  # [B] -> [B * (L - 1)]
        return jnp.repeat(x, n)

    return sampling.RowParams(
        temperature=rows(temperature),
        top_k=rows(top_k),
        top_p=rows(top_p),
        min_p=rows(min_p),
        seed=jnp.zeros((batch * n,), jnp.uint32),
        position=jnp.broadcast_to(jnp.arange(1, length, dtype=jnp.int32), (batch, n)).reshape(-1),
        target=tokens[:, 1:].reshape(-1).astype(jnp.int32),
        use_target=jnp.ones((batch * n,), jnp.bool_),
    )


def _entropy(raw: jax.Array, rp: sampling.RowParams, logprobs_mode: str) -> jax.Array:
    """f32[R] entropy of the distribution the values refer to (processed or raw)."""
    raw = raw.astype(jnp.float32)
    z = sampling.processed_logits(raw, rp) if logprobs_mode.startswith("processed") else raw
    logp = jax.nn.log_softmax(z, axis=-1)
    finite = jnp.isfinite(logp)
    safe = jnp.where(finite, logp, 0.0)
    return -jnp.sum(jnp.where(finite, jnp.exp(safe) * safe, 0.0), axis=-1)


@functools.partial(
    jax.jit,
    static_argnames=(
        "config", "logprobs_mode", "lm_head_dtype", "numerics", "page_size", "with_entropy",
    ),
)
def _token_values(
    params: Params,
    tokens: jax.Array,
    prompt_lens: jax.Array,
    completion_lens: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    min_p: jax.Array,
    *,
    config: ModelConfig,
    logprobs_mode: str,
    lm_head_dtype: str,
    numerics: Numerics,
    page_size: int,
    with_entropy: bool,
):
    batch, length = tokens.shape
    layout, num_pages = fixed_layout(batch, length, page_size)
    # Pad the flat token and logit-row counts to whole row tiles, as the engine's buckets are:
    # padding tokens sit at position -1 and write nothing; padding logit rows are dropped.
    t_pad = _round_up(batch * length, PAD_MULTIPLE) - batch * length
    r_pad = _round_up(batch * (length - 1), PAD_MULTIPLE) - batch * (length - 1)

    def padded(x, n, fill):
        return jnp.concatenate([jnp.asarray(x, jnp.int32), jnp.full((n,), fill, jnp.int32)])

    layout = Batch(
        tokens=padded(tokens.reshape(-1).astype(jnp.int32), t_pad, 0),
        positions=padded(layout.positions, t_pad, -1),
        seq_ids=padded(layout.seq_ids, t_pad, 0),
        slots=padded(layout.slots, t_pad, num_pages * page_size),
        page_table=jnp.asarray(layout.page_table),
        logit_rows=padded(layout.logit_rows, r_pad, 0),
    )
    kv = empty_kv_cache(config, num_pages, page_size, params["embed"].dtype)
    logits, _ = forward(params, config, layout, kv, numerics, lm_head_dtype)
    logits = logits[: batch * (length - 1)]
    rp = _row_params(tokens, temperature, top_k, top_p, min_p)
    sel = sampling.select(logits, rp, logprobs_mode)
    mask = completion_mask(prompt_lens, completion_lens, length)
    values = jnp.where(mask, sel.value.reshape(batch, length - 1), 0.0)
    if not with_entropy:
        return values
    ent = _entropy(jax.lax.stop_gradient(logits), rp, logprobs_mode).reshape(batch, length - 1)
    return values, jnp.where(mask, ent, 0.0)


def token_logprobs(
    params: Params,
    config: ModelConfig,
    tokens: jax.Array,
    prompt_lens: jax.Array,
    completion_lens: jax.Array | None = None,
    *,
    sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    temperature: Any = None,
    top_k: Any = None,
    top_p: Any = None,
    min_p: Any = None,
    logprobs_mode: str = "processed_logprobs",
    lm_head_dtype: str = "float32",
    numerics: str = "invariant",
    kernel_backend: str = "auto",
    page_size: int = DEFAULT_PAGE_SIZE,
    with_entropy: bool = False,
):
    """Per-token numbers of `tokens` under `params`, teacher-forced: f32[B, L - 1].

    Args:
      params: the model params pytree (differentiate w.r.t. it).
      config: the model's `ModelConfig` (static).
      tokens: i32[B, L], prompt then completion then any padding, per row.
      prompt_lens: i32[B], prompt length of each row (>= 1).
      completion_lens: i32[B], completion tokens of each row; None means the rest of the row.
      sampling_params: the SamplingParams the tokens were sampled with (one, or one per row).
        Alternatively pass `temperature` / `top_k` / `top_p` / `min_p` as scalars or [B] arrays
        (they override sampling_params field by field). None everywhere = temperature 1, no
        filters.
      logprobs_mode, lm_head_dtype, numerics, kernel_backend: as in `EngineConfig`; match the
        engine's to get its bits (defaults are the engine's defaults).
      page_size: scratch page size of the fixed layout; changes no bit.
      with_entropy: also return f32[B, L - 1] entropies of the (processed, under the processed
        modes) distribution each token was drawn from (no gradient flows through them).
    Returns:
      values f32[B, L - 1] (column t scores tokens[:, t + 1]; 0.0 outside
      `completion_mask(prompt_lens, completion_lens, L)`), or (values, entropy).

    Jit-able and differentiable w.r.t. params; every argument except params, tokens, lengths and
    sampling arrays is static.
    """
    check_numerics_settings(logprobs_mode, lm_head_dtype, numerics)
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [B, L] with L >= 2, got shape {tokens.shape}")
    batch, length = tokens.shape
    prompt_lens = jnp.broadcast_to(jnp.asarray(prompt_lens, jnp.int32), (batch,))
    if completion_lens is None:
        completion_lens = length - prompt_lens
    completion_lens = jnp.broadcast_to(jnp.asarray(completion_lens, jnp.int32), (batch,))
    sp = sampling_arrays(sampling_params, batch)
    return _token_values(
        params,
        tokens,
        prompt_lens,
        completion_lens,
        _per_seq(sp["temperature"] if temperature is None else temperature, 1.0, jnp.float32, batch),
        _per_seq(sp["top_k"] if top_k is None else top_k, 0, jnp.int32, batch),
        _per_seq(sp["top_p"] if top_p is None else top_p, 1.0, jnp.float32, batch),
        _per_seq(sp["min_p"] if min_p is None else min_p, 0.0, jnp.float32, batch),
        config=config,
        logprobs_mode=logprobs_mode,
        lm_head_dtype=lm_head_dtype,
        numerics=Numerics(mode=numerics, backend=default_backend(kernel_backend)),
        page_size=page_size,
        with_entropy=with_entropy,
    )


def pack(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    length: int | None = None,
    pad_id: int = 0,
    rollout_logprobs: Sequence[Sequence[float]] | None = None,
) -> dict[str, np.ndarray]:
    """Host-side: right-padded `tokens` i32[B, L], `prompt_lens`, `completion_lens`, and when
    `rollout_logprobs` is given, `logprobs` f32[B, L - 1] aligned with `token_logprobs` (0 outside
    the completion)."""
    lens = [len(p) + len(c) for p, c in zip(prompts, completions)]
    length = length or max(lens)
    if max(lens) > length:
        raise ValueError(f"a sequence has {max(lens)} tokens, more than length={length}")
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    out_lp = np.zeros((len(prompts), length - 1), np.float32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        tokens[i, : len(p) + len(c)] = list(p) + list(c)
        if rollout_logprobs is not None:
            lp = np.asarray(rollout_logprobs[i], np.float32)
            out_lp[i, len(p) - 1 : len(p) - 1 + len(c)] = lp
    out = dict(
        tokens=tokens,
        prompt_lens=np.asarray([len(p) for p in prompts], np.int32),
        completion_lens=np.asarray([len(c) for c in completions], np.int32),
    )
    if rollout_logprobs is not None:
        out["logprobs"] = out_lp
    return out
