"""Decoder-only transformer as pure functions over a params pytree.

One function, `forward`, serves every caller: the engine's ragged step (decode tokens and prefill
chunks together), `jengine.score` (a whole sequence teacher-forced) and the differentiable RL
scorer. A token's hidden state is computed by the same ops whatever batch it sits in, so the
logits of a row depend on that row's own tokens only.

Params pytree (HF names in brackets; every matrix is `[out, in]`, nn.Linear's layout, applied as
`x @ w^T`; the embedding doubles as the tied lm_head):
  embed        [vocab, hidden]                  (model.embed_tokens.weight)
  final_norm   [hidden]                         (model.norm.weight)
  lm_head      [vocab, hidden], untied only     (lm_head.weight)
  layers[i]:
    attn_norm  [hidden]                         (input_layernorm.weight)
    wq [heads*head_dim, hidden]  wk, wv [kv_heads*head_dim, hidden]  wo [hidden, heads*head_dim]
    bq, bk, bv [.. out]          qkv_bias only (Qwen2)
    q_norm, k_norm [head_dim]    qk_norm only (Qwen3, Gemma 3)
    post_attn_norm [hidden]      post_norms only (Gemma: post_attention_layernorm.weight)
    mlp_norm   [hidden]          (post_attention_layernorm.weight; Gemma: pre_feedforward_layernorm)
    w_gate, w_up [intermediate, hidden]  w_down [hidden, intermediate]
    post_mlp_norm [hidden]       post_norms only (Gemma: post_feedforward_layernorm.weight)

With `norm_unit_offset` (Gemma) norm weights are stored zero-centred, as HF stores them, and scale
by `1 + w`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jengine.config import ModelConfig, Numerics
from jengine.plan import StepPlan
from pallas_kernels import ops

Params = dict[str, Any]
KVCache = list[tuple[jax.Array, jax.Array]]  # per layer: (k_pages, v_pages)


@dataclasses.dataclass(frozen=True)
class Model:
    """A config and its params. `params` may live on any device/sharding."""

    config: ModelConfig
    params: Params


def param_shapes(config: ModelConfig) -> Params:
    """The params pytree with shape tuples as leaves: the contract loaders check against."""
    h, d = config.hidden_size, config.head_dim
    q_out, kv_out = config.num_heads * d, config.num_kv_heads * d
    layer = {
        "attn_norm": (h,),
        "wq": (q_out, h),
        "wk": (kv_out, h),
        "wv": (kv_out, h),
        "wo": (h, q_out),
        "mlp_norm": (h,),
        "w_gate": (config.intermediate_size, h),
        "w_up": (config.intermediate_size, h),
        "w_down": (h, config.intermediate_size),
    }
    if config.qkv_bias:
        layer.update(bq=(q_out,), bk=(kv_out,), bv=(kv_out,))
    if config.qk_norm:
        layer.update(q_norm=(d,), k_norm=(d,))
    if config.post_norms:
        layer.update(post_attn_norm=(h,), post_mlp_norm=(h,))
    shapes: Params = {
        "embed": (config.vocab_size, h),
        "final_norm": (h,),
        "layers": [dict(layer) for _ in range(config.num_layers)],
    }
    if not config.tie_word_embeddings:
        shapes["lm_head"] = (config.vocab_size, h)
    return shapes


def init_params(config: ModelConfig, seed: int = 0, dtype: str | None = None) -> Params:
    """Random params from `seed` (numpy's PCG64, so no per-shape compile): matrices ~ N(0, 0.02),
    norm scales ~ 1 + N(0, 0.1) (stored as N(0, 0.1) under `norm_unit_offset`), biases
    ~ N(0, 0.02)."""
    dtype = jnp.dtype(dtype or config.dtype)
    rng = np.random.default_rng(seed)
    norm_shift = 0.0 if config.norm_unit_offset else 1.0

    def init(path, shape) -> jax.Array:
        noise = rng.standard_normal(shape, dtype=np.float32)
        scale_shift = (0.1, norm_shift) if "norm" in jax.tree_util.keystr(path) else (0.02, 0.0)
        return jnp.asarray(scale_shift[0] * noise + scale_shift[1], dtype=dtype)

    return jax.tree_util.tree_map_with_path(
        init, param_shapes(config), is_leaf=lambda x: isinstance(x, tuple)
    )


def rope_inv_freq(config: ModelConfig, sliding: bool = False) -> np.ndarray:
    """f32[head_dim/2] inverse frequencies, as HF computes them: a full-attention layer's from
    rope_theta with `rope_scaling` (Llama 3 bands or linear), a sliding layer's from
    rope_local_theta (default rope_theta), unscaled."""
    d = config.head_dim
    theta = (config.rope_local_theta or config.rope_theta) if sliding else config.rope_theta
    inv = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
    inv = inv.astype(np.float32)
    rs = None if sliding else config.rope_scaling
    if rs is None:
        return inv
    if rs.rope_type == "linear":
        return (inv / np.float32(rs.factor)).astype(np.float32)
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """x[T, heads, D] rotated by position (HF's rotate-half convention); x's dtype out."""
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]  # [T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos = jnp.cos(emb).astype(x.dtype)[:, None, :]
    sin = jnp.sin(emb).astype(x.dtype)[:, None, :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def _linear(x: jax.Array, w: jax.Array, b: jax.Array | None, numerics: Numerics) -> jax.Array:
    y = ops.matmul(x, w, numerics)
    if b is not None:
        y = y + b.astype(jnp.float32)
    return y.astype(x.dtype)


def _norm(x: jax.Array, w: jax.Array, config: ModelConfig, numerics: Numerics) -> jax.Array:
    """RMSNorm over the last axis. Llama form `w * normed(x).astype(dtype)`, or with
    `norm_unit_offset` Gemma's `(normed(x) * (1 + w)).astype(dtype)`, all in fp32: the Llama
    kernel on fp32 inputs is exactly that product, rounded once."""
    if not config.norm_unit_offset:
        return ops.rms_norm(x, w, config.rms_norm_eps, numerics)
    scale = 1.0 + w.astype(jnp.float32)
    return ops.rms_norm(x.astype(jnp.float32), scale, config.rms_norm_eps, numerics).astype(x.dtype)


# Element-wise, so a row's bits depend on its own values only (tests check rows across buckets).
ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


def _layer(
    layer: Params,
    h: jax.Array,
    kv: tuple[jax.Array, jax.Array],
    batch: StepPlan,
    config: ModelConfig,
    numerics: Numerics,
    inv_freq: np.ndarray,
    tp: Any = None,
    sliding_window: int | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    num_tokens = h.shape[0]
    d = config.head_dim
    x = _norm(h, layer["attn_norm"], config, numerics)
    # heads held here: all of them, or this device's slice under tensor parallelism (`tp`)
    q = _linear(x, layer["wq"], layer.get("bq"), numerics).reshape(num_tokens, -1, d)
    kv_numerics = numerics if tp is None else tp.kv_numerics
    k = _linear(x, layer["wk"], layer.get("bk"), kv_numerics).reshape(num_tokens, -1, d)
    v = _linear(x, layer["wv"], layer.get("bv"), kv_numerics).reshape(num_tokens, -1, d)
    if tp is not None:
        k, v = tp.local_kv(k), tp.local_kv(v)
    if config.qk_norm:
        q = _norm(q, layer["q_norm"], config, numerics)
        k = _norm(k, layer["k_norm"], config, numerics)
    q = apply_rope(q, batch.positions, inv_freq)
    k = apply_rope(k, batch.positions, inv_freq)
    k_pages, v_pages = ops.write_kv(kv[0], kv[1], k, v, batch.slots)
    attn = ops.attention(
        q,
        k_pages,
        v_pages,
        batch.page_table,
        batch.seq_ids,
        batch.positions,
        numerics,
        sm_scale=config.attn_scale,
        sliding_window=sliding_window,
        soft_cap=config.attn_logit_softcap,
    )
    gather = (lambda a: a) if tp is None else tp.gather  # all-gather columns: no partial sums
    out = gather(_linear(gather(attn.reshape(num_tokens, -1)), layer["wo"], None, numerics))
    if config.post_norms:
        out = _norm(out, layer["post_attn_norm"], config, numerics)
    h = h + out
    x = _norm(h, layer["mlp_norm"], config, numerics)
    gate = _linear(x, layer["w_gate"], None, numerics)
    up = _linear(x, layer["w_up"], None, numerics)
    act = ACTIVATIONS[config.hidden_act]
    out = gather(_linear(gather(act(gate) * up), layer["w_down"], None, numerics))
    if config.post_norms:
        out = _norm(out, layer["post_mlp_norm"], config, numerics)
    return h + out, (k_pages, v_pages)


def lm_head_weight(params: Params, config: ModelConfig) -> jax.Array:
    return params["embed"] if config.tie_word_embeddings else params["lm_head"]


def embed(params: Params, config: ModelConfig, tokens: jax.Array, tp: Any = None) -> jax.Array:
    """[T, hidden] embeddings in the params' dtype; Gemma's times sqrt(hidden) in that dtype."""
    table = params["embed"]
    h = table[tokens] if tp is None else tp.embed(table, tokens)
    if config.scale_embeddings:  # HF: a float32 scalar cast to the weights' dtype, then multiplied
        h = h * jnp.asarray(np.float32(config.hidden_size**0.5)).astype(table.dtype)
    return h


def forward(
    params: Params,
    config: ModelConfig,
    batch: StepPlan,
    kv: KVCache,
    numerics: Numerics,
    tp: Any = None,
) -> tuple[jax.Array, KVCache]:
    """One ragged step.

    Args:
      params: see the module docstring; dtype float32 or bfloat16.
      config: the model's shape (static).
      batch: the step's (padded) plan: token rows, decode tokens and prefill chunks mixed; only
        its token-level fields and `logit_rows` are read here.
      kv: per layer (k_pages, v_pages), [num_pages, page_size, kv_heads, head_dim]. Donate it.
        A sliding layer keeps every key too; its attention skips the KV blocks outside the window.
      numerics: which kernel lowering every op uses, and the lm_head dtype (static): 'float32'
        upcasts the final hidden state and the head weight and accumulates in fp32; 'bfloat16'
        computes the head in bf16 inputs; 'model' uses the params' dtype.
      tp: None, or (inside `jengine.sharding`'s shard_map) the tensor-parallel context: params,
        kv and heads are this device's shards and `tp` all-gathers activations between them.
    Returns:
      (f32[R, vocab] logits of `batch.logit_rows` (soft-capped when `final_logit_softcap`), the KV
      cache with this step's K/V written).
    """
    dtype = params["embed"].dtype
    inv_freq = {False: rope_inv_freq(config), True: rope_inv_freq(config, sliding=True)}
    h = embed(params, config, batch.tokens, tp)
    new_kv = []
    for i, (layer, layer_kv) in enumerate(zip(params["layers"], kv)):
        sliding = config.is_sliding(i)
        window = config.sliding_window if sliding else None
        h, layer_kv = _layer(
            layer, h, layer_kv, batch, config, numerics, inv_freq[sliding], tp, window
        )
        new_kv.append(layer_kv)
    h = h[batch.logit_rows]
    h = _norm(h, params["final_norm"], config, numerics)
    head_dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "model": dtype}[
        numerics.lm_head_dtype
    ]
    w = lm_head_weight(params, config)
    logits = ops.matmul(h.astype(head_dtype), w.astype(head_dtype), numerics)
    if tp is not None:
        logits = tp.gather(logits)
    return ops.apply_soft_cap(logits, config.final_logit_softcap), new_kv


def empty_kv_cache(
    config: ModelConfig, num_pages: int, page_size: int, dtype: Any
) -> KVCache:
    """Zeroed per-layer (k_pages, v_pages), each [num_pages, page_size, kv_heads, head_dim]."""
    shape = (num_pages, page_size, config.num_kv_heads, config.head_dim)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_layers)]
