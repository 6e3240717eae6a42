"""Differentiable, batched trainer-side logprobs that are bitwise the engine's rollout logprobs.

`token_logprobs(params, config, tokens[B, L], prompt_lens[B], completion_lens[B])` runs the same
`models.transformer.forward` and `sampling.select` (the tokens as targets) as the engine's compiled
step, over a fixed teacher-forcing layout (`dense_plan`, made by the engine's `plan.build`). Every
op is row-invariant, so a completion token's value is the engine's logprob of it, bit for bit,
when `logprobs_mode`, the `Numerics` (pass `engine.numerics`) and the sampling filters match.

Alignment: output column t holds the number of `tokens[:, t + 1]` given `tokens[:, : t + 1]`,
so the output is f32[B, L - 1]; `completion_mask` says which columns are completion tokens.
Columns outside the mask hold 0.0 (never -inf or NaN, so masked losses have finite gradients).

Differentiable w.r.t. params: every invariant op is a `jax.custom_vjp` whose backward pass is the
plain-JAX reference (`pallas_kernels.ops`), so `jax.grad` gives ordinary gradients; with
`Numerics(mode="fast")` the whole computation is plain XLA (the reference implementation).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jengine import plan as plan_lib
from jengine import sampling, sharding
from jengine.config import LOGPROBS_MODES, ModelConfig, Numerics, SamplingParams, check_choice
from jengine.models.transformer import Params, ScratchKV, forward, head, lm_head_weight
from jengine.scoring import layout, per_sequence

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


def dense_plan(batch: int, length: int, page_size: int) -> tuple[plan_lib.StepPlan, int]:
    """The teacher-forcing plan of a [batch, length] token block, padded to whole row tiles.

    Every token of every row is computed; logit row b * (length - 1) + t scores token t + 1 of row
    b; row b's pages are the static range b * P .. b * P + P - 1 (P = ceil(length / page_size)).
    Tokens, targets and sampling settings are left as placeholders (filled under jit): the plan
    depends on the shapes only, so it traces as numpy constants. Returns (plan, num_pages).
    """
    pages = -(-length // page_size)
    placeholder = SamplingParams()
    rows = [plan_lib.Row(t, placeholder, 0, t + 1, 0) for t in range(length - 1)]
    chunks = [plan_lib.Chunk([0] * length, 0, range(b * pages, (b + 1) * pages), rows)
              for b in range(batch)]  # fmt: skip
    layout = plan_lib.build(chunks, page_size, pages)
    num_tokens = _round_up(batch * length, PAD_MULTIPLE)
    num_rows = _round_up(batch * (length - 1), PAD_MULTIPLE)
    return layout.padded(num_tokens, batch, num_rows, batch * pages * page_size), batch * pages


def _entropy(raw: jax.Array, rp: plan_lib.SampleRows, logprobs_mode: str) -> jax.Array:
    """f32[R] entropy of the distribution the values refer to (processed or raw)."""
    raw = raw.astype(jnp.float32)
    z = sampling.processed_logits(raw, rp) if logprobs_mode.startswith("processed") else raw
    logp = jax.nn.log_softmax(z, axis=-1)
    finite = jnp.isfinite(logp)
    safe = jnp.where(finite, logp, 0.0)
    return -jnp.sum(jnp.where(finite, jnp.exp(safe) * safe, 0.0), axis=-1)


HEAD_CHUNK = 64  # rows per chunk of the head's backward pass


def _head_values(h: jax.Array, w: jax.Array, rp: plan_lib.SampleRows, n: int, config: ModelConfig,
                 numerics: Numerics, logprobs_mode: str) -> jax.Array:  # fmt: skip
    """f32[n] `sampling.select(head(h, w)[:n], rp).value`: exactly that computation forward; its
    backward recomputes the logits HEAD_CHUNK rows at a time (the reference gradient of each
    chunk, the head's weight gradient accumulated), so a gradient never holds a [rows, vocab]
    array. h: [R >= n, hidden] final-normed hidden states, w: the lm_head [vocab, hidden]."""
    names = [f.name for f in dataclasses.fields(plan_lib.SampleRows)]

    def chunk_values(h, w, *fields):
        logits = head(h, w, config, numerics)
        return sampling.select(logits[: fields[0].shape[0]], plan_lib.SampleRows(*fields),
                               logprobs_mode).value  # fmt: skip

    @jax.custom_vjp
    def values(h, w, *fields):
        return chunk_values(h, w, *fields)

    def values_fwd(h, w, *fields):
        return chunk_values(h, w, *fields), (h, w, fields)

    def values_bwd(res, g):
        h, w, fields = res
        pad = -n % HEAD_CHUNK
        chunks = lambda x: jnp.pad(x[:n], [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(  # noqa
            -1, HEAD_CHUNK, *x.shape[1:])
        pad_fields = [chunks(f) for f in fields]

        def body(dw, xs):
            h_c, g_c, *f_c = xs
            _, vjp = jax.vjp(lambda h_c, w: chunk_values(h_c, w, *f_c), h_c, w)
            dh_c, dw_c = vjp(g_c)
            return dw + dw_c.astype(jnp.float32), dh_c

        dw, dh = jax.lax.scan(body, jnp.zeros(w.shape, jnp.float32),
                              (chunks(h), chunks(g), *pad_fields))  # fmt: skip
        dh = jnp.zeros_like(h).at[:n].set(dh.reshape(-1, h.shape[1])[:n].astype(h.dtype))
        return (dh, dw.astype(w.dtype), *[None] * len(fields))

    values.defvjp(values_fwd, values_bwd)
    return values(h, w, *(getattr(rp, k) for k in names))


@functools.partial(jax.jit, static_argnames=("config", "logprobs_mode", "numerics", "mesh",
                                              "page_size", "with_entropy", "remat",
                                              "with_routing"))  # fmt: skip
def _token_values(params: Params, tokens: jax.Array, prompt_lens: jax.Array,
                  completion_lens: jax.Array, sampling_rows: dict[str, jax.Array],
                  loss_mask: jax.Array | None, *,
                  config: ModelConfig, logprobs_mode: str, numerics: Numerics,
                  mesh: jax.sharding.Mesh | None, page_size: int, with_entropy: bool,
                  remat: bool, with_routing: bool = False):  # fmt: skip
    batch, length = tokens.shape
    dp = 1 if mesh is None else sharding.mesh_sizes(mesh)[0]
    layout, num_pages = dense_plan(batch // dp, length, page_size)
    n = batch // dp * (length - 1)  # logit rows of one data row

    def fill(tok: jax.Array, rows: dict[str, jax.Array]) -> plan_lib.StepPlan:
        """The layout with tok i32[b, L] and per-row sampling settings [b] filled in."""
        pad = layout.num_tokens - tok.size
        flat = jnp.concatenate([tok.reshape(-1).astype(jnp.int32), jnp.zeros((pad,), jnp.int32)])
        per_row = {k: jnp.repeat(v, length - 1) for k, v in rows.items()}
        r_pad = layout.logit_rows.shape[0] - n
        sample_rows = plan_lib.SampleRows(
            **{k: jnp.pad(v, (0, r_pad)) for k, v in per_row.items()},
            seed=jnp.zeros((layout.logit_rows.shape[0],), jnp.uint32),
            position=jnp.asarray(layout.rows.position),
            target=jnp.pad(tok[:, 1:].reshape(-1).astype(jnp.int32), (0, r_pad)),
            use_target=jnp.asarray(layout.rows.use_target),
        )
        return dataclasses.replace(layout, tokens=flat, rows=sample_rows)

    def post(logits: jax.Array, p: plan_lib.StepPlan, routing: jax.Array):
        rp = jax.tree_util.tree_map(lambda x: x[:n], p.rows)
        logits = logits[:n]
        values = sampling.select(logits, rp, logprobs_mode).value
        ent = _entropy(jax.lax.stop_gradient(logits), rp, logprobs_mode) if with_entropy else None
        return values, ent, routing[p.logit_rows[:n]] if with_routing else None

    if remat:  # a gradient keeps the logits, not every [rows, vocab] sampling intermediate
        post = jax.checkpoint(post)
    if mesh is None and remat:  # the head's backward in row chunks: no [rows, vocab] array kept
        p = fill(tokens, sampling_rows)
        h, _, routing = forward(params, config, p, ScratchKV(num_pages, page_size), numerics,
                                remat=True, hidden=True, return_routing=True)  # fmt: skip
        routing = routing[p.logit_rows[:n]] if with_routing else None
        rp = jax.tree_util.tree_map(lambda x: x[:n], p.rows)
        values = _head_values(h, lm_head_weight(params, config), rp, n, config, numerics,
                              logprobs_mode)  # fmt: skip
        ent = None
        if with_entropy:
            logits = jax.lax.stop_gradient(head(h, lm_head_weight(params, config), config,
                                                numerics))[:n]  # fmt: skip
            ent = _entropy(logits, rp, logprobs_mode)
    elif mesh is None:
        kv = ScratchKV(num_pages, page_size)
        p = fill(tokens, sampling_rows)
        logits, _, routing = forward(params, config, p, kv, numerics, remat=remat,
                                     return_routing=True)  # fmt: skip
        values, ent, routing = post(logits, p, routing)
    else:
        split = lambda x: x.reshape(dp, batch // dp, *x.shape[1:])  # noqa: E731
        plans = jax.vmap(fill)(split(tokens), {k: split(v) for k, v in sampling_rows.items()})
        kv = ScratchKV(num_pages, page_size)
        (values, ent, routing), _ = sharding.sharded_forward(
            mesh, sharding.shard_params(params, config, mesh), config, plans, kv, numerics, post,
            remat=remat,
        )
    mask = completion_mask(prompt_lens, completion_lens, length)
    mask = mask if loss_mask is None else mask & loss_mask
    out = [jnp.where(mask, values.reshape(batch, length - 1), 0.0)]
    if with_entropy:
        out.append(jnp.where(mask, ent.reshape(batch, length - 1), 0.0))
    if with_routing:
        out.append(routing.reshape(batch, length - 1, *routing.shape[-2:]))
    return out[0] if len(out) == 1 else tuple(out)


def token_logprobs(
    params: Params, config: ModelConfig, tokens: jax.Array, prompt_lens: jax.Array,
    completion_lens: jax.Array | None = None, *,
    sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    temperature: Any = None, top_k: Any = None, top_p: Any = None, min_p: Any = None,
    logprobs_mode: str = "processed_logprobs", numerics: Numerics | None = None,
    mesh: jax.sharding.Mesh | None = None, page_size: int = DEFAULT_PAGE_SIZE,
    with_entropy: bool = False, mask: jax.Array | None = None, remat: bool = True,
    return_routing: bool = False,
):  # fmt: skip
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
      logprobs_mode: as in `EngineConfig`.
      numerics: a `jengine.Numerics`; pass `engine.numerics` to get the engine's bits. None: the
        defaults, with column_blocks = the mesh's 'model' size.
      mesh: optional ('data', 'model') mesh: the forward runs tensor parallel over 'model' and
        splits the rows over 'data' (B must be a multiple of the 'data' size). Same bits as one
        device with the same numerics.
      page_size: scratch page size of the layout; changes no bit.
      with_entropy: also return f32[B, L - 1] entropies of the (processed, under the processed
        modes) distribution each token was drawn from (no gradient flows through them).
      mask: optional bool[B, L - 1], the columns to keep within the completion, e.g. a packed
        trajectory's `loss_mask` (its model-sampled tokens).
      remat: under differentiation, recompute activations in the backward pass instead of
        keeping them: each scan period of layers, and the sampling transforms over the logits
        (`jax.checkpoint`). The values are the same bits either way; True keeps a gradient's
        memory to one period's activations plus the logits.
      return_routing: also return the routing it used, i32[B, L - 1, num_sparse_layers, k]:
        column t holds the experts (by rank) each sparse layer routed token t to, the row that
        scores tokens[:, t + 1] (a completion token's column equals the engine's
        `RequestOutput.routed_experts` row for it); columns past a row's tokens route padding.
    Returns:
      values f32[B, L - 1] (column t scores tokens[:, t + 1]; 0.0 outside
      `completion_mask(prompt_lens, completion_lens, L)` and `mask`), then the entropy and the
      routing when asked (a tuple).

    Jit-able and differentiable w.r.t. params; every argument except params, tokens, lengths and
    sampling arrays is static.
    """
    check_choice("logprobs_mode", logprobs_mode, LOGPROBS_MODES)
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [B, L] with L >= 2, got shape {tokens.shape}")
    batch, length = tokens.shape
    mesh, dp, numerics = layout(params, config, mesh, numerics)
    if batch % dp:
        raise ValueError(f"tokens has {batch} rows, not a multiple of the mesh's data size {dp}")
    prompt_lens = jnp.broadcast_to(jnp.asarray(prompt_lens, jnp.int32), (batch,))
    if completion_lens is None:
        completion_lens = length - prompt_lens
    completion_lens = jnp.broadcast_to(jnp.asarray(completion_lens, jnp.int32), (batch,))
    per_seq = per_sequence(sampling_params, batch)
    given = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    rows = {k: jnp.broadcast_to(jnp.asarray([getattr(s, k) for s in per_seq] if given[k] is None
                                            else given[k], plan_lib.ROW_DTYPES[k]), (batch,))
            for k in plan_lib.FILTERS}  # fmt: skip
    if mask is not None:
        mask = jnp.asarray(mask, jnp.bool_)
        if mask.shape != (batch, length - 1):
            raise ValueError(f"mask has shape {mask.shape}, expected {(batch, length - 1)}")
    return _token_values(
        params, tokens, prompt_lens, completion_lens, rows, mask, config=config,
        logprobs_mode=logprobs_mode, numerics=numerics, mesh=mesh, page_size=page_size,
        with_entropy=with_entropy, remat=remat, with_routing=return_routing,
    )  # fmt: skip


def pack(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]] | None = None,
         length: int | None = None, pad_id: int = 0,
         rollout_logprobs: Sequence[Sequence[float]] | None = None) -> dict[str, np.ndarray]:
    """Host-side: right-padded `tokens` i32[B, L], `prompt_lens`, `completion_lens`, and when
    `rollout_logprobs` is given, `logprobs` f32[B, L - 1] aligned with `token_logprobs` (0 outside
    the completion). `pack(trajectories)` packs `rl.Trajectory`s, with their `loss_mask` and
    `versions` (`rl.trajectory.pack_trajectories`)."""
    if completions is None:
        from jengine.rl.trajectory import pack_trajectories

        return pack_trajectories(prompts, length, pad_id)
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
    out = dict(tokens=tokens, prompt_lens=np.asarray([len(p) for p in prompts], np.int32),
               completion_lens=np.asarray([len(c) for c in completions], np.int32))  # fmt: skip
    if rollout_logprobs is not None:
        out["logprobs"] = out_lp
    return out
