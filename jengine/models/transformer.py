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
  layers: every layer's leaf stacked on a leading [num_layers] axis, layer i's `wq` is
  `layers["wq"][i]` (model.layers.{i}.self_attn.q_proj.weight); per layer:
    attn_norm  [hidden]                         (input_layernorm.weight)
    wq [heads*head_dim, hidden]  wk, wv [kv_heads*head_dim, hidden]  wo [hidden, heads*head_dim]
    bq, bk, bv [.. out]          qkv_bias only (Qwen2)
    q_norm, k_norm [head_dim]    qk_norm only (Qwen3, Gemma 3)
    post_attn_norm [hidden]      post_norms only (Gemma: post_attention_layernorm.weight)
    mlp_norm   [hidden]          (post_attention_layernorm.weight; Gemma: pre_feedforward_layernorm)
    w_gate, w_up [intermediate, hidden]  w_down [hidden, intermediate]   dense layers only
    post_mlp_norm [hidden]       post_norms only (Gemma: post_feedforward_layernorm.weight)
  a sparse layer's MLP (num_experts E > 0, I = moe_intermediate_size; Mixtral's names in braces):
    router [E, hidden]                          (mlp.gate.weight {block_sparse_moe.gate.weight})
    experts_gate, experts_up [E, I, hidden]     (mlp.experts.{e}.gate_proj / up_proj.weight {w1/w3})
    experts_down [E, hidden, I]                 (mlp.experts.{e}.down_proj.weight {w2})
    shared_w_gate, shared_w_up [S, hidden]  shared_w_down [hidden, S]  shared_expert_gate
    [1, hidden]                  Qwen2-MoE only (mlp.shared_expert.*_proj, mlp.shared_expert_gate)
  Each leaf stacks only the layers that have it (`leaf_layers`): the dense MLP's the dense layers,
  the experts' the sparse layers (`ModelConfig.is_sparse`), the rest every layer.

With `norm_unit_offset` (Gemma) norm weights are stored zero-centred, as HF stores them, and scale
by `1 + w`. `stack_layers` / `unstack_layers` convert from / to a list of per-layer dicts.

The layers run under one `jax.lax.scan`, so a step compiles one layer body whatever the depth.
Layers whose kind differs (Gemma's sliding and full layers, dense and sparse MLPs) repeat with a
period p (`layer_period`): the scan body is one period (p layers, each with its static window,
RoPE table and MLP kind), over num_layers // p periods; a leaf holds the same number of layers in
every period, and the period's j-th layer reads its rank among them; the num_layers % p layers
left over run after it, unrolled.
The KV cache is one stacked pair; a layer's pages are rows `layer * num_pages ...` of the cache
viewed as [num_layers * num_pages, ...] (page ids are offset, nothing is copied).
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
KVCache = tuple[jax.Array, jax.Array]  # (k_pages, v_pages), each [layers, pages, page, kv_heads, D]


@dataclasses.dataclass(frozen=True)
class ScratchKV:
    """`forward`'s `kv` for a step that starts from empty pages and keeps none (teacher-forced
    scoring): each layer writes into its own zeroed [num_pages, page_size, kv_heads, D] pool, so
    nothing is carried from layer to layer (and a gradient never holds the whole cache)."""

    num_pages: int
    page_size: int


@dataclasses.dataclass(frozen=True)
class Model:
    """A config and its params. `params` may live on any device/sharding."""

    config: ModelConfig
    params: Params


DENSE_MLP_LEAVES = ("w_gate", "w_up", "w_down")
EXPERT_LEAVES = ("router", "experts_gate", "experts_up", "experts_down")
SHARED_EXPERT_LEAVES = ("shared_w_gate", "shared_w_up", "shared_w_down", "shared_expert_gate")


def layer_shapes(config: ModelConfig, layer: int | None = None) -> dict[str, tuple[int, ...]]:
    """Layer `layer`'s leaves and their shapes (None: every leaf some layer has). A stacked leaf
    adds a leading axis over the layers that have it (`leaf_layers`)."""
    h, d = config.hidden_size, config.head_dim
    q_out, kv_out = config.num_heads * d, config.num_kv_heads * d
    layers = range(config.num_layers) if layer is None else (layer,)
    shapes = {
        "attn_norm": (h,),
        "wq": (q_out, h),
        "wk": (kv_out, h),
        "wv": (kv_out, h),
        "wo": (h, q_out),
        "mlp_norm": (h,),
    }
    if not all(config.is_sparse(i) for i in layers):
        i = config.intermediate_size
        shapes.update(w_gate=(i, h), w_up=(i, h), w_down=(h, i))
    if any(config.is_sparse(i) for i in layers):
        e, i = config.num_experts, config.moe_intermediate_size
        s = config.shared_expert_intermediate_size
        shapes.update(router=(e, h), experts_gate=(e, i, h), experts_up=(e, i, h),
                      experts_down=(e, h, i))  # fmt: skip
        if s:
            shapes.update(shared_w_gate=(s, h), shared_w_up=(s, h), shared_w_down=(h, s),
                          shared_expert_gate=(1, h))  # fmt: skip
    if config.qkv_bias:
        shapes.update(bq=(q_out,), bk=(kv_out,), bv=(kv_out,))
    if config.qk_norm:
        shapes.update(q_norm=(d,), k_norm=(d,))
    if config.post_norms:
        shapes.update(post_attn_norm=(h,), post_mlp_norm=(h,))
    return shapes


def leaf_layers(config: ModelConfig, name: str) -> tuple[int, ...]:
    """The layers stacked in `params["layers"][name]`, in order: the dense MLP's leaves over the
    dense layers, the experts' (and shared expert's) over the sparse layers, the others over all."""
    every = range(config.num_layers)
    if name in EXPERT_LEAVES or name in SHARED_EXPERT_LEAVES:
        return config.sparse_layers
    if name in DENSE_MLP_LEAVES:
        return tuple(i for i in every if not config.is_sparse(i))
    return tuple(every)


def layer_leaves(layers: Params, config: ModelConfig, layer: int) -> Params:
    """Layer `layer`'s own leaves out of stacks laid out as `leaf_layers` says (row = the layer's
    rank among the layers stacked in the leaf)."""
    out = {}
    for name, w in layers.items():
        members = leaf_layers(config, name)
        if layer in members:
            out[name] = w[members.index(layer)]
    return out


def _outer_shapes(config: ModelConfig) -> Params:
    shapes: Params = {"embed": (config.vocab_size, config.hidden_size),
                      "final_norm": (config.hidden_size,)}  # fmt: skip
    if not config.tie_word_embeddings:
        shapes["lm_head"] = (config.vocab_size, config.hidden_size)
    return shapes


def param_shapes(config: ModelConfig) -> Params:
    """The params pytree with shape tuples as leaves: the contract loaders check against."""
    layers = {k: (len(leaf_layers(config, k)), *s) for k, s in layer_shapes(config).items()}
    return {**_outer_shapes(config), "layers": layers}


def stack_layers(params: Params) -> Params:
    """`params` with `layers` a list of per-layer dicts turned into jengine's stacked form: each
    leaf stacked over the layers that have it, in layer order."""
    layers = params["layers"]
    if isinstance(layers, dict):
        return params
    names = dict.fromkeys(k for layer in layers for k in layer)
    stacked = {k: jnp.stack([layer[k] for layer in layers if k in layer]) for k in names}
    return {**params, "layers": stacked}


def unstack_layers(params: Params, config: ModelConfig | None = None) -> Params:
    """jengine's params with `layers` as a list of per-layer dicts (views: `x[i]`), each holding
    the leaves its layer has. `config` is needed when leaves stack different layers (a model with
    dense and sparse layers)."""
    layers = params["layers"]
    n = len(layers["attn_norm"])
    if config is None:
        if any(len(w) != n for w in layers.values()):
            raise ValueError("params stack some leaves over a subset of the layers (dense and "
                             "sparse layers mixed): pass the model's config")  # fmt: skip
        return {**params, "layers": [{k: w[i] for k, w in layers.items()} for i in range(n)]}
    return {**params, "layers": [layer_leaves(layers, config, i) for i in range(n)]}


def init_params(config: ModelConfig, seed: int = 0, dtype: str | None = None) -> Params:
    """Random params from `seed` (numpy's PCG64, so no per-shape compile): matrices ~ N(0, 0.02),
    norm scales ~ 1 + N(0, 0.1) (stored as N(0, 0.1) under `norm_unit_offset`), biases
    ~ N(0, 0.02)."""
    dtype = jnp.dtype(dtype or config.dtype)
    rng = np.random.default_rng(seed)
    norm_shift = 0.0 if config.norm_unit_offset else 1.0

    def init(path, shape) -> np.ndarray:
        noise = rng.standard_normal(shape, dtype=np.float32)
        scale_shift = (0.1, norm_shift) if "norm" in jax.tree_util.keystr(path) else (0.02, 0.0)
        return scale_shift[0] * noise + scale_shift[1]

    # drawn leaf by leaf in the order of the per-layer tree, then stacked on the host
    per_layer = [layer_shapes(config, i) for i in range(config.num_layers)]
    per_layer = {**_outer_shapes(config), "layers": per_layer}
    host = jax.tree_util.tree_map_with_path(init, per_layer, is_leaf=lambda x: isinstance(x, tuple))
    host["layers"] = {k: np.stack([layer[k] for layer in host["layers"] if k in layer])
                      for k in layer_shapes(config)}  # fmt: skip
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype=dtype), host)


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


def _write_and_attend(
    q: jax.Array, k: jax.Array, v: jax.Array, kv: KVCache | ScratchKV, layer: Any,
    batch: StepPlan, config: ModelConfig, numerics: Numerics, sliding_window: int | None,
) -> tuple[jax.Array, KVCache | ScratchKV]:
    """Writes the step's k, v [T, kv_heads, D] into layer `layer`'s pages and attends q to them.

    With a stacked cache the layer's pages are addressed in place: the cache is viewed as
    [layers * pages, ...], page ids and slots offset by `layer * pages` (padding slots stay out of
    range). With `ScratchKV` the layer gets a zeroed pool of its own."""
    if isinstance(kv, ScratchKV):
        shape = (kv.num_pages, kv.page_size, *k.shape[1:])
        zeros = jnp.zeros(shape, k.dtype)
        k_pages, v_pages = ops.write_kv(zeros, zeros, k, v, batch.slots)
        page_table, new_kv = batch.page_table, kv
    else:
        stacked = kv[0].shape  # [layers, pages, page, kv_heads, D]
        pool = stacked[1] * stacked[2]
        flat = (stacked[0] * stacked[1], *stacked[2:])
        slots = jnp.where(batch.slots < pool, batch.slots + layer * pool, stacked[0] * pool)
        k_pages, v_pages = ops.write_kv(kv[0].reshape(flat), kv[1].reshape(flat), k, v, slots)
        page_table = batch.page_table + layer * stacked[1]
        new_kv = (k_pages.reshape(stacked), v_pages.reshape(stacked))
    attn = ops.attention(
        q,
        k_pages,
        v_pages,
        page_table,
        batch.seq_ids,
        batch.positions,
        numerics,
        sm_scale=config.attn_scale,
        sliding_window=sliding_window,
        soft_cap=config.attn_logit_softcap,
    )
    return attn, new_kv


def _mlp(prefix: str, x: jax.Array, layer: Params, config: ModelConfig, numerics: Numerics,
         gather: Any) -> jax.Array:
    """The dense SwiGLU MLP of leaves `{prefix}w_gate`, `{prefix}w_up`, `{prefix}w_down`."""
    gate = _linear(x, layer[prefix + "w_gate"], None, numerics)
    up = _linear(x, layer[prefix + "w_up"], None, numerics)
    act = ACTIVATIONS[config.hidden_act]
    return gather(_linear(gather(act(gate) * up), layer[prefix + "w_down"], None, numerics))


def _moe(x: jax.Array, layer: Params, config: ModelConfig, numerics: Numerics,
         tp: Any) -> tuple[jax.Array, jax.Array]:
    """A sparse layer's MLP on x[T, H]: (out [T, H], expert_ids i32[T, k]).

    Router logits through the invariant matmul (fp32), `ops.route` (softmax, top-k with ties to
    the lower index, renormalised under `norm_topk_prob`), `ops.experts` (each token's k expert
    MLPs summed by rank in fp32); plus Qwen2-MoE's shared expert scaled by sigmoid(its gate).
    The router and the shared expert's gate are replicated under tensor parallelism and computed
    in one column block on every device (their E or 1 rows need not divide column_blocks)."""
    one_block = numerics.replace(column_blocks=1)
    ids, weights = ops.route(x, layer["router"], one_block, k=config.num_experts_per_tok,
                             renormalize=config.norm_topk_prob)  # fmt: skip
    experts = (layer["experts_gate"], layer["experts_up"], layer["experts_down"])
    out = ops.experts(x, ids, weights, *experts, numerics) if tp is None else tp.experts(
        x, ids, weights, *experts, numerics)  # fmt: skip
    if config.shared_expert_intermediate_size:
        gather = (lambda a: a) if tp is None else tp.gather
        shared = _mlp("shared_", x, layer, config, numerics, gather)
        scale = jax.nn.sigmoid(_linear(x, layer["shared_expert_gate"], None, one_block))
        out = out + scale * shared
    return out, ids


def _layer(
    layer: Params,
    index: Any,
    h: jax.Array,
    kv: KVCache | ScratchKV,
    batch: StepPlan,
    config: ModelConfig,
    numerics: Numerics,
    tp: Any = None,
    sliding: bool = False,
) -> tuple[jax.Array, KVCache | ScratchKV, jax.Array | None]:
    """Decoder layer `index` (i32, traced under the scan) with its own weights `layer` (a sparse
    layer's hold the `router`). Returns (h, kv, the expert ids i32[T, k] of a sparse layer, else
    None)."""
    num_tokens = h.shape[0]
    d = config.head_dim
    inv_freq = rope_inv_freq(config, sliding=sliding)
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
    window = config.sliding_window if sliding else None
    attn, kv = _write_and_attend(q, k, v, kv, index, batch, config, numerics, window)
    gather = (lambda a: a) if tp is None else tp.gather  # all-gather columns: no partial sums
    out = gather(_linear(gather(attn.reshape(num_tokens, -1)), layer["wo"], None, numerics))
    if config.post_norms:
        out = _norm(out, layer["post_attn_norm"], config, numerics)
    h = h + out
    x = _norm(h, layer["mlp_norm"], config, numerics)
    ids = None
    if "router" in layer:
        out, ids = _moe(x, layer, config, numerics, tp)
    else:
        out = _mlp("", x, layer, config, numerics, gather)
    if config.post_norms:
        out = _norm(out, layer["post_mlp_norm"], config, numerics)
    return h + out, kv, ids


def layer_period(config: ModelConfig) -> int:
    """The smallest p with layer i's kind == layer (i mod p)'s for every i, a kind being (sliding
    or full attention, sparse or dense MLP): 1 when all layers are alike; Gemma 3's 5 sliding + 1
    full: 6; Gemma 2's alternation: 2; Qwen's decoder_sparse_step s: s."""
    kinds = [(config.is_sliding(i), config.is_sparse(i)) for i in range(config.num_layers)]
    return next(p for p in range(1, len(kinds) + 1)
                if all(k == kinds[i % p] for i, k in enumerate(kinds)))  # fmt: skip


def _decoder(
    layers: Params, config: ModelConfig, h: jax.Array, kv: KVCache | ScratchKV, batch: StepPlan,
    numerics: Numerics, tp: Any, remat: bool,
) -> tuple[jax.Array, KVCache | ScratchKV, jax.Array]:
    """Every decoder layer: a scan over the periods of `layer_period`, then the leftover layers.

    Each leaf's stack (`leaf_layers`) holds the same number n of its layers in every period: its
    first periods * n rows are grouped [periods, n, ...] (n = 1: the stack as it is) and the
    period's j-th layer reads row (its rank among the period's layers in the leaf). Returns (h,
    kv, routing i32[T, num_sparse_layers, k]: each token's experts per sparse layer, in layer
    order)."""
    period = layer_period(config)
    periods = config.num_layers // period
    done = periods * period
    sliding = [config.is_sliding(j) for j in range(period)]

    scratch = kv if isinstance(kv, ScratchKV) else None  # not carried: not an array

    def one_period(carry, xs):
        h, kv = carry
        weights, first = xs  # weights: every leaf [its layers in a period, ...]; first: i32
        weights = {k: w if w.ndim == layers[k].ndim else w[None] for k, w in weights.items()}
        routed = []
        for j in range(period):
            layer = layer_leaves(weights, config, j)
            h, kv, ids = _layer(layer, first + j, h, scratch or kv, batch, config, numerics, tp,
                                sliding[j])  # fmt: skip
            routed += [] if ids is None else [ids]
        return (h, () if scratch else kv), routed

    if remat:
        one_period = jax.checkpoint(one_period)

    def grouped(name: str, w: jax.Array) -> jax.Array:
        n = sum(1 for i in leaf_layers(config, name) if i < period)
        if n == 1 and len(w) == periods:  # the stack itself: XLA copies a [periods, 1, ...] view
            return w  # into the loop on every call
        return w[: periods * n].reshape(periods, n, *w.shape[1:])

    grouped_layers = {name: grouped(name, w) for name, w in layers.items()}
    firsts = jnp.arange(0, done, period, dtype=jnp.int32)
    (h, kv), routed = jax.lax.scan(one_period, (h, () if scratch else kv),
                                   (grouped_layers, firsts))  # fmt: skip
    # routed: per sparse layer of a period i32[periods, T, k] -> [sparse layers, T, k] in order
    k = max(config.num_experts_per_tok, 1)
    routed = [jnp.stack(routed, 1).reshape(-1, h.shape[0], k)] if routed else []
    kv = scratch or kv
    for i in range(done, config.num_layers):  # fewer than `period` layers
        layer = layer_leaves(layers, config, i)
        h, kv, ids = _layer(layer, i, h, kv, batch, config, numerics, tp, config.is_sliding(i))
        routed += [] if ids is None else [ids[None]]
    routing = jnp.concatenate(routed) if routed else jnp.zeros((0, h.shape[0], k), jnp.int32)
    return h, kv, jnp.swapaxes(routing, 0, 1)


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
    kv: KVCache | ScratchKV,
    numerics: Numerics,
    tp: Any = None,
    remat: bool = False,
    hidden: bool = False,
    return_routing: bool = False,
) -> tuple[jax.Array, KVCache | ScratchKV]:
    """One ragged step.

    Args:
      params: see the module docstring; dtype float32 or bfloat16.
      config: the model's shape (static).
      batch: the step's (padded) plan: token rows, decode tokens and prefill chunks mixed; only
        its token-level fields and `logit_rows` are read here.
      kv: the stacked (k_pages, v_pages), each [num_layers, num_pages, page_size, kv_heads,
        head_dim] (donate it), or `ScratchKV` (empty pages per layer, nothing kept). A sliding
        layer keeps every key too; its attention skips the KV blocks outside the window.
      numerics: which kernel lowering every op uses, and the lm_head dtype (static): 'float32'
        upcasts the final hidden state and the head weight and accumulates in fp32; 'bfloat16'
        computes the head in bf16 inputs; 'model' uses the params' dtype.
      tp: None, or (inside `jengine.sharding`'s shard_map) the tensor-parallel context: params,
        kv and heads are this device's shards and `tp` all-gathers activations between them.
      remat: recompute each scan period's activations in the backward pass instead of keeping
        them (`jax.checkpoint`): a gradient then holds one period's activations, not every
        layer's. Values are unchanged.
      hidden: return the final-normed hidden states [R, hidden] of the logit rows instead of
        their logits (`head` computes those).
      return_routing: also return the routing, i32[T, num_sparse_layers, k]: every token row's
        expert ids per sparse layer (in layer order), by rank (an empty axis for a dense model).
    Returns:
      (f32[R, vocab] logits of `batch.logit_rows` (soft-capped when `final_logit_softcap`), the KV
      cache with this step's K/V written[, the routing]).
    """
    h = embed(params, config, batch.tokens, tp)
    h, kv, routing = _decoder(params["layers"], config, h, kv, batch, numerics, tp, remat)
    h = _norm(h[batch.logit_rows], params["final_norm"], config, numerics)
    out = h if hidden else head(h, lm_head_weight(params, config), config, numerics, tp)
    return (out, kv, routing) if return_routing else (out, kv)


def head(h: jax.Array, w: jax.Array, config: ModelConfig, numerics: Numerics,
         tp: Any = None) -> jax.Array:  # fmt: skip
    """f32[R, vocab] logits of the final-normed hidden states h[R, hidden] under the lm_head
    w[vocab, hidden] (soft-capped when `final_logit_softcap`), in `numerics.lm_head_dtype`."""
    head_dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "model": w.dtype}[
        numerics.lm_head_dtype
    ]
    logits = ops.matmul(h.astype(head_dtype), w.astype(head_dtype), numerics)
    if tp is not None:
        logits = tp.gather(logits)
    return ops.apply_soft_cap(logits, config.final_logit_softcap)


def empty_kv_cache(config: ModelConfig, num_pages: int, page_size: int, dtype: Any) -> KVCache:
    """Zeroed stacked (k_pages, v_pages), each [num_layers, num_pages, page_size, kv_heads,
    head_dim]."""
    shape = (config.num_layers, num_pages, page_size, config.num_kv_heads, config.head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
