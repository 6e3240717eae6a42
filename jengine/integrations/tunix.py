"""jengine inside Tunix: a rollout engine, and a trainer-side actor with the rollout's logprobs.

    from jengine.integrations.tunix import JengineActor, JengineRollout

    actor = JengineActor(model, rollout_config)   # model: a Tunix Qwen3 (dense or MoE) or Llama3
    cluster_config = rl_cluster_lib.ClusterConfig(..., rollout_engine=JengineRollout,
                                                  rollout_config=rollout_config)
    rl_cluster = rl_cluster_lib.RLCluster(actor=actor, reference=model, tokenizer=tokenizer,
                                          cluster_config=cluster_config)

`JengineRollout` (a `tunix.rl.rollout.base_rollout.BaseRollout`) serves the actor's weights from a
jengine `Engine`: `generate` returns jengine's processed logprobs (the distribution each token was
drawn from), `get_per_token_logps` is `jengine.score` (bitwise those numbers), `update_params` maps
Tunix's NNX state onto jengine's params and calls `Engine.update_weights` (validated first).

`JengineActor` is the trainer side: a Tunix model (same call, same state paths) whose numbers
are jengine's, with the gradient of the plain-JAX reference kernels (jengine's `custom_vjp`s).

  * `actor.per_token_logps(prompt_tokens, completion_tokens, pad_id)` is
    `jengine.rl.token_logprobs` in the layout of `tunix.rl.common.compute_per_token_logps`:
    bitwise the rollout's logprobs. Importing this module registers it as Tunix's "grpo"
    policy loss (`grpo_loss_fn`: Tunix's GRPO objective, scored with `per_token_logps` for a
    JengineActor, Tunix's own function for any other model), so the GRPO learner trains on the
    rollout's exact numbers and the first update of every step has a policy ratio of exactly 1.
  * `actor(tokens, positions, cache=None, attention_mask)` returns, for Tunix's generic callers
    (`compute_per_token_logps`: cut, divide by the temperature, log-softmax), jengine's raw fp32
    logits with the tokens the rollout's top-k / top-p dropped set to `MASKED`: the same
    processed distribution, but the log-softmax is then Tunix's, compiled by XLA inside Tunix's
    program, and its last bit can differ from jengine's (seen on XLA:CPU at a 64-token
    vocabulary: 5 of 64 tokens one ulp apart; none at 32k-152k-token vocabularies).

Why a loss and not only the logits: whatever logits the actor returns, Tunix's result passes
through an exp, a sum over the vocabulary that includes the target's own term, and a log, all
rounded as XLA compiles Tunix's program; no choice of logits pins those bits. Exact numbers have
to be computed where the loss is computed. The policy-loss registry is the hook Tunix provides;
`AlgorithmConfig` accepts only the names "grpo" and "ppo", hence the re-registration of "grpo"
(with the fallback above). No Tunix function is patched.

The actor holds the Tunix model's own submodules, so `nnx.state(actor)` has the Tunix model's
paths and shapes: checkpoints, optimizers, `nnx.update(model, nnx.state(actor))` and weight syncs
see a Tunix model. Parameters are copied at construction (Tunix's trainer donates its buffers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tunix.generate import tokenizer_adapter
from tunix.rl.rollout import base_rollout

import jengine
import jengine.rl
from jengine import plan as _plan
from jengine import sampling as _sampling
from jengine.config import EngineConfig, ModelConfig, Numerics, SamplingParams
from jengine.engine import Engine
from jengine.models.transformer import (Model, Params, ScratchKV, forward, stack_layers,
                                        unstack_layers)
from pallas_kernels.tiling import map_row_tiles

# Value the actor gives tokens the filters dropped: exp(MASKED / T - max) is exactly 0 for any
# temperature jengine accepts (>= 1e-5), as exp(-inf) is, and MASKED / T stays finite.
MASKED = -1e30
# Tunix 0.1.7's Qwen3 and Llama3 call `apply_rope` without their config's `rope_theta`, so their
# forward always rotates with this base; the mapping reproduces what the model computes.
TUNIX_ROPE_THETA = 1_000_000.0
UPDATE_MODES = ("keep", "recompute", "abort")
_PAD_MULTIPLE = 32  # flat token / logit-row counts padded to whole row tiles, as the engine's are
_PAGE_SIZE = 16  # scratch page size of the actor's fixed layout; changes no bit


# -- the calls into jengine's core: the one place to adapt when its API changes -------------------


def _build_engine(model: Model, config: EngineConfig) -> Engine:
    return Engine(model, config)


def _score(engine: Engine, prompts, completions, sampling: SamplingParams) -> list[np.ndarray]:
    """`jengine.score` under the engine's numerics: the rollout's bits. Lists in, list out."""
    return jengine.score(engine.model, prompts, completions, sampling, numerics=engine.numerics,
                         logprobs_mode=engine.config.logprobs_mode)  # fmt: skip


def _token_logprobs(
    params: Params, config: ModelConfig, tokens, prompt_lens, completion_lens,
    sampling: SamplingParams, numerics: Numerics, with_entropy: bool,
):
    """`jengine.rl.token_logprobs`: f32[B, L - 1] processed logprobs, bitwise the rollout's."""
    return jengine.rl.token_logprobs(
        params, config, tokens, prompt_lens, completion_lens, sampling_params=sampling,
        logprobs_mode="processed_logprobs", numerics=numerics, with_entropy=with_entropy,
    )  # fmt: skip


def _raw_logits(
    params: Params, config: ModelConfig, tokens: jax.Array, real: jax.Array, numerics: Numerics
) -> jax.Array:
    """f32[B, L, V] jengine logits of every real token of tokens i32[B, L] (real: bool[B, L]).

    Row b is one sequence; its real tokens take positions 0, 1, ... in order (pad tokens are
    skipped, as Tunix's `build_positions_from_mask` skips them) and their KV lives in the static
    pages b * P .. b * P + P - 1. Pad rows hold 0.0. Jit-able and differentiable in `params`.
    """
    b, length = tokens.shape
    pages = -(-length // _PAGE_SIZE)
    num_pages = b * pages
    pos = jnp.where(real, jnp.cumsum(real, axis=1) - 1, -1).astype(jnp.int32).reshape(-1)
    seq = jnp.repeat(jnp.arange(b, dtype=jnp.int32), length)
    slots = jnp.where(pos >= 0, seq * (pages * _PAGE_SIZE) + pos, num_pages * _PAGE_SIZE)
    n = b * length
    pad = -(-n // _PAD_MULTIPLE) * _PAD_MULTIPLE - n

    def padded(x, fill):
        return jnp.concatenate([x.astype(jnp.int32), jnp.full((pad,), fill, jnp.int32)])

    batch = _plan.StepPlan(
        tokens=padded(tokens.reshape(-1), 0),
        positions=padded(pos, -1),
        seq_ids=padded(seq, 0),
        slots=padded(slots, num_pages * _PAGE_SIZE),
        page_table=jnp.asarray(
            np.arange(b, dtype=np.int32)[:, None] * pages + np.arange(pages, dtype=np.int32)
        ),
        logit_rows=padded(jnp.arange(n, dtype=jnp.int32), 0),
        rows=None,  # the forward reads the token-level fields only
    )
    logits, _ = forward(params, config, batch, ScratchKV(num_pages, _PAGE_SIZE), numerics)
    logits = logits[:n].reshape(b, length, -1)
    return jnp.where(real[..., None], logits, 0.0)


def _kept(raw: jax.Array, sp: SamplingParams) -> jax.Array:
    """bool[B, L, V]: the tokens `sp`'s filters keep, computed as the engine computes them."""
    b, length, vocab = raw.shape
    rows = b * length
    rp = _plan.SampleRows(
        temperature=jnp.full((rows,), sp.temperature, jnp.float32),
        top_k=jnp.full((rows,), sp.top_k, jnp.int32),
        top_p=jnp.full((rows,), sp.top_p, jnp.float32),
        min_p=jnp.full((rows,), sp.min_p, jnp.float32),
        seed=jnp.zeros((rows,), jnp.uint32),
        position=jnp.zeros((rows,), jnp.int32),
        target=jnp.zeros((rows,), jnp.int32),
        use_target=jnp.ones((rows,), jnp.bool_),
    )
    fields = [getattr(rp, f.name) for f in dataclasses.fields(_plan.SampleRows)]

    def tile(raw_t, *f):
        return jnp.isfinite(_sampling.processed_logits(raw_t, _plan.SampleRows(*f)))

    kept = map_row_tiles(tile, raw.reshape(rows, vocab), *fields, differentiable=True)
    return kept.reshape(b, length, vocab)


# -- Tunix models <-> jengine params ---------------------------------------------------------------


def _family(model: Any) -> str:
    """'qwen3' or 'llama3' for a Tunix model (or a JengineActor); else a ValueError naming it."""
    if isinstance(model, JengineActor):
        return model.family
    from tunix.models.llama3 import model as llama3
    from tunix.models.qwen3 import model as qwen3

    name = f"{type(model).__module__}.{type(model).__qualname__}"
    if isinstance(model, qwen3.Qwen3):
        return "qwen3"
    if isinstance(model, llama3.Llama3):
        return "llama3"
    raise ValueError(f"cannot map {name} onto jengine's params: supported Tunix models are "
                     "tunix.models.qwen3.model.Qwen3 (dense or MoE) and "
                     "tunix.models.llama3.model.Llama3")


def jengine_config(model: Any, *, max_model_len: int = 4096) -> ModelConfig:
    """The jengine `ModelConfig` of a Tunix Qwen3 / Llama3 model (what its forward computes).

    A Tunix Qwen3 with `num_experts` is Qwen3-MoE as Tunix builds it: every layer sparse, each
    expert `hidden_dim` wide, the top-k gate weights renormalised, no shared expert."""
    family = _family(model)
    c = model.config
    moe = {}
    if family == "qwen3":
        tied, dtype = c.use_tied_embedding, jnp.dtype(c.param_dtype)
        if c.num_experts:
            moe = {"num_experts": c.num_experts, "num_experts_per_tok": c.num_experts_per_tok,
                   "moe_intermediate_size": c.hidden_dim, "norm_topk_prob": True}
    else:
        tied, dtype = c.weight_tying, jnp.dtype(model.embedder.input_embedding.get_value().dtype)
    return ModelConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.embed_dim,
        intermediate_size=c.hidden_dim,
        num_layers=c.num_layers,
        num_heads=c.num_heads,
        num_kv_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        rope_theta=TUNIX_ROPE_THETA,
        rms_norm_eps=float(c.norm_eps),
        qk_norm=family == "qwen3",
        tie_word_embeddings=bool(tied),
        max_position_embeddings=max_model_len,
        dtype="bfloat16" if dtype == jnp.bfloat16 else "float32",
        name=f"tunix-{family}{'-moe' if moe else ''}",
        **moe,
    )


def tunix_shapes(config: ModelConfig) -> dict[tuple, tuple[int, ...]]:
    """The Tunix state's leaves, path -> shape (d hidden, N/K heads/kv heads, H head_dim; MoE:
    E experts, each FE = moe_intermediate_size wide)."""
    d, h, f, v = config.hidden_size, config.head_dim, config.intermediate_size, config.vocab_size
    n, k, e = config.num_heads, config.num_kv_heads, config.num_experts
    shapes = {("embedder", "input_embedding"): (v, d), ("final_norm", "w"): (d,)}
    if not config.tie_word_embeddings:
        shapes[("lm_head", "w")] = (d, v)
    for i in range(config.num_layers):
        a = ("layers", i, "attn")
        shapes.update({
            ("layers", i, "input_layernorm", "w"): (d,),
            ("layers", i, "post_attention_layernorm", "w"): (d,),
            (*a, "q_proj", "w"): (d, n, h),   # BTD,DNH->BTNH
            (*a, "k_proj", "w"): (d, k, h),
            (*a, "v_proj", "w"): (d, k, h),
            (*a, "o_proj", "w"): (n, h, d),   # BTNH,NHD->BTD
        })
        mlp = ("layers", i, "mlp")
        if config.is_sparse(i):
            fe = config.moe_intermediate_size
            shapes.update({(*mlp, "router", "kernel"): (d, e), (*mlp, "gate_proj"): (e, d, fe),
                           (*mlp, "up_proj"): (e, d, fe), (*mlp, "down_proj"): (e, fe, d)})
        else:
            shapes.update({(*mlp, "gate_proj", "kernel"): (d, f),
                           (*mlp, "up_proj", "kernel"): (d, f),
                           (*mlp, "down_proj", "kernel"): (f, d)})
        if config.qk_norm:
            shapes[(*a, "q_norm", "w")] = (h,)
            shapes[(*a, "k_norm", "w")] = (h,)
    return shapes


def _flat(tree: Any) -> dict[tuple, Any]:
    """{path tuple: array} of an nnx.State or a nested dict (an `nnx.to_pure_dict`)."""
    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    out = {}

    def walk(node, path):
        if isinstance(node, Mapping):
            for key, child in node.items():
                walk(child, (*path, key))
        else:
            out[path] = node.get_value() if isinstance(node, nnx.Variable) else node

    walk(tree, ())
    return out


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def check_tunix_state(state: Any, config: ModelConfig) -> dict[tuple, Any]:
    """The flat state after checking it holds exactly the expected leaves, shapes and float
    dtypes; else a ValueError naming every bad leaf (nothing is changed)."""
    flat = _flat(state)
    want = tunix_shapes(config)
    errors = [f"missing {_dotted(p)}" for p in want if p not in flat]
    errors += [f"unexpected {_dotted(p)}" for p in flat if p not in want]
    for p, shape in want.items():
        x = flat.get(p)
        if x is None:
            continue
        if tuple(getattr(x, "shape", ())) != shape:
            got = tuple(getattr(x, "shape", ()))
            errors.append(f"{_dotted(p)} has shape {got}, expected {shape}")
        elif jnp.dtype(x.dtype) not in (jnp.float32, jnp.bfloat16):
            errors.append(f"{_dotted(p)} has dtype {x.dtype}, expected float32 or bfloat16")
    if errors:
        more = f" (+{len(errors) - 12} more)" if len(errors) > 12 else ""
        raise ValueError(f"Tunix state does not map onto jengine's {config.name} params: "
                         + "; ".join(errors[:12]) + more)
    return flat


def to_jengine_params(state: Any, config: ModelConfig, dtype: Any = None) -> Params:
    """Tunix state (nnx.State or pure dict) -> jengine params (every matrix [out, in]).

    Checked first (`check_tunix_state`). Every leaf is a new array (cast to `dtype` if given),
    never one of the caller's buffers. Exact: only transposes, reshapes and copies.
    """
    flat = check_tunix_state(state, config)
    d = config.hidden_size
    dtype = jnp.dtype(dtype or config.dtype)

    def get(*path):
        return jnp.array(flat[path], dtype=dtype, copy=True)

    def layer(i):
        a = ("layers", i, "attn")
        out = {
            "attn_norm": get("layers", i, "input_layernorm", "w"),
            "wq": get(*a, "q_proj", "w").reshape(d, -1).T,     # [d, N, H] -> [N*H, d]
            "wk": get(*a, "k_proj", "w").reshape(d, -1).T,
            "wv": get(*a, "v_proj", "w").reshape(d, -1).T,
            "wo": get(*a, "o_proj", "w").reshape(-1, d).T,     # [N, H, d] -> [d, N*H]
            "mlp_norm": get("layers", i, "post_attention_layernorm", "w"),
        }
        mlp = ("layers", i, "mlp")
        if config.is_sparse(i):
            out.update(
                router=get(*mlp, "router", "kernel").T,           # [d, E] -> [E, d]
                experts_gate=get(*mlp, "gate_proj").mT,           # [E, d, F] -> [E, F, d]
                experts_up=get(*mlp, "up_proj").mT,
                experts_down=get(*mlp, "down_proj").mT,           # [E, F, d] -> [E, d, F]
            )
        else:
            out.update(
                w_gate=get(*mlp, "gate_proj", "kernel").T,        # [d, F] -> [F, d]
                w_up=get(*mlp, "up_proj", "kernel").T,
                w_down=get(*mlp, "down_proj", "kernel").T,        # [F, d] -> [d, F]
            )
        if config.qk_norm:
            out.update(q_norm=get(*a, "q_norm", "w"), k_norm=get(*a, "k_norm", "w"))
        return out

    params = {
        "embed": get("embedder", "input_embedding"),
        "final_norm": get("final_norm", "w"),
        "layers": [layer(i) for i in range(config.num_layers)],
    }
    if not config.tie_word_embeddings:
        params["lm_head"] = get("lm_head", "w").T  # [d, V] -> [V, d]
    return stack_layers(params)


def to_tunix_state(params: Params, config: ModelConfig) -> dict:
    """jengine params -> the Tunix state as a pure nested dict (`nnx.replace_by_pure_dict`)."""
    d, h = config.hidden_size, config.head_dim
    n, k = config.num_heads, config.num_kv_heads

    def copy(x):
        return jnp.array(x, copy=True)

    def layer(p):
        attn = {
            "q_proj": {"w": p["wq"].T.reshape(d, n, h)},
            "k_proj": {"w": p["wk"].T.reshape(d, k, h)},
            "v_proj": {"w": p["wv"].T.reshape(d, k, h)},
            "o_proj": {"w": p["wo"].T.reshape(n, h, d)},
        }
        if config.qk_norm:
            attn.update(q_norm={"w": copy(p["q_norm"])}, k_norm={"w": copy(p["k_norm"])})
        if "router" in p:
            mlp = {"router": {"kernel": p["router"].T}, "gate_proj": p["experts_gate"].mT,
                   "up_proj": p["experts_up"].mT, "down_proj": p["experts_down"].mT}
        else:
            mlp = {"gate_proj": {"kernel": p["w_gate"].T}, "up_proj": {"kernel": p["w_up"].T},
                   "down_proj": {"kernel": p["w_down"].T}}
        return {
            "input_layernorm": {"w": copy(p["attn_norm"])},
            "post_attention_layernorm": {"w": copy(p["mlp_norm"])},
            "attn": attn,
            "mlp": mlp,
        }

    out = {
        "embedder": {"input_embedding": copy(params["embed"])},
        "final_norm": {"w": copy(params["final_norm"])},
        "layers": {i: layer(p) for i, p in enumerate(unstack_layers(params)["layers"])},
    }
    if not config.tie_word_embeddings:
        out["lm_head"] = {"w": params["lm_head"].T}
    return out


# -- RolloutConfig -> SamplingParams ---------------------------------------------------------------


def sampling_params(
    rollout_config: base_rollout.RolloutConfig, eos_ids: Sequence[int] = ()
) -> SamplingParams:
    """A request's SamplingParams from Tunix's RolloutConfig (seed left to `request_seeds`).

    temperature 0 is greedy; top_p None -> 1; top_k None, 0 or -1 -> off; generation stops at
    `rollout_config.eos_tokens`, else at `eos_ids` (the tokenizer's eos).
    """
    top_k = rollout_config.top_k
    top_p = rollout_config.top_p
    stops = rollout_config.eos_tokens if rollout_config.eos_tokens else eos_ids
    return SamplingParams(
        temperature=float(rollout_config.temperature),
        top_k=0 if top_k is None or top_k <= 0 else int(top_k),
        top_p=1.0 if top_p is None else float(top_p),
        max_tokens=int(rollout_config.max_tokens_to_generate),
        stop_token_ids=tuple(int(t) for t in stops),
    )


def request_seeds(seed: Any, call: int, n: int) -> list[int | None]:
    """Per-request seeds for the `call`-th generate of n prompts.

    None: the engine derives each request's seed from its own seed and the arrival index. Else
    (an int, or a Tunix/JAX PRNG key) seeds are drawn from numpy's SeedSequence of (seed, call):
    reproducible, and fresh noise on every call (Tunix's samplers reuse the same key each call).
    """
    if seed is None:
        return [None] * n
    if isinstance(seed, jax.Array) and jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
        seed = jax.random.key_data(seed)
    entropy = [int(v) for v in np.asarray(seed).astype(np.uint64).ravel()]
    state = np.random.SeedSequence([*entropy, call]).generate_state(n, np.uint32)
    return [int(s) & 0x7FFFFFFF for s in state]


def _sampling_key(sp: SamplingParams) -> tuple:
    """What a logprob depends on besides the tokens and weights."""
    return (sp.temperature, sp.top_k, sp.top_p, sp.min_p)


def _tokenizer(tokenizer: Any) -> tokenizer_adapter.TokenizerAdapter:
    if isinstance(tokenizer, tokenizer_adapter.TokenizerAdapter):
        return tokenizer
    return tokenizer_adapter.TokenizerAdapter(tokenizer)


# -- the rollout engine ----------------------------------------------------------------------------


class JengineRollout(base_rollout.BaseRollout):
    """A Tunix rollout engine backed by a jengine `Engine` (`ClusterConfig(rollout_engine=...)`).

    Constructed by Tunix's RLCluster as `JengineRollout(rollout_actor=, tokenizer=, mesh=,
    rollout_config=)`; pass `functools.partial(JengineRollout, engine_config=..., update_mode=...)`
    to set jengine's knobs. The engine runs on one device (jengine's own tensor/data parallelism is
    set in `engine_config`; Tunix's mesh is not used).

    Args:
      rollout_actor: a Tunix Qwen3 (dense or MoE) / Llama3 model or a `JengineActor`: its
        weights are served.
      tokenizer: Tunix's tokenizer (wrapped in a TokenizerAdapter if it is not one).
      rollout_config: sizes the engine: max_model_len = kv_cache_size, at least
        max_prompt_length + max_tokens_to_generate.
      engine_config: an `EngineConfig`; its max_model_len, if None, is set as above.
        logprobs_mode must be 'processed_logprobs' (what JengineActor reproduces).
      update_mode: `Engine.update_weights` mode of `update_params`: 'keep' (default), 'recompute'
        or 'abort' (Tunix generates synchronously, so no sequence is in flight at a sync).
      reuse_rollout_logprobs: `get_per_token_logps` returns the logprobs recorded at generation
        for (prompt, completion) pairs generated since the last update (the same bits
        `jengine.score` gives) instead of scoring them again.
    """

    def __init__(
        self,
        rollout_actor: nnx.Module,
        tokenizer: Any,
        mesh: Any = None,
        rollout_config: base_rollout.RolloutConfig | None = None,
        *,
        engine_config: EngineConfig | None = None,
        update_mode: str = "keep",
        reuse_rollout_logprobs: bool = True,
    ):
        if update_mode not in UPDATE_MODES:
            raise ValueError(f"update_mode={update_mode!r} must be one of {UPDATE_MODES}")
        rollout_config = rollout_config or base_rollout.RolloutConfig()
        engine_config = engine_config or EngineConfig()
        if engine_config.logprobs_mode != "processed_logprobs":
            raise ValueError(f"engine_config.logprobs_mode={engine_config.logprobs_mode!r}: "
                             "JengineRollout serves 'processed_logprobs' (what "
                             "JengineActor.per_token_logps computes)")
        max_model_len = engine_config.max_model_len or max(
            rollout_config.kv_cache_size,
            rollout_config.max_prompt_length + rollout_config.max_tokens_to_generate,
        )
        engine_config = engine_config.replace(max_model_len=max_model_len)
        self._tokenizer = _tokenizer(tokenizer)
        self._mesh = mesh
        self._config = jengine_config(rollout_actor, max_model_len=max_model_len)
        # The served model: the actor's weights as jengine params (copies; the trainer donates).
        graphdef, state, rest = nnx.split(rollout_actor, nnx.Param, ...)
        self._graphdef, self._rest = graphdef, rest
        self._state_template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        # On one device, outside any mesh of Tunix's: the engine places (or shards) them itself.
        params = jax.device_put(to_jengine_params(state, self._config), jax.devices()[0])
        self._engine = _build_engine(Model(self._config, params), engine_config)
        self.update_mode = update_mode
        self.reuse_rollout_logprobs = reuse_rollout_logprobs
        self._sampling = sampling_params(rollout_config, [self.eos_id()])
        self._calls = 0
        self._recorded: dict[tuple, np.ndarray] = {}  # (sampling, prompt, completion) -> logprobs

    # -- BaseRollout ----------------------------------------------------------------------------

    def generate(
        self, prompts: list[str], rollout_config: base_rollout.RolloutConfig, **kwargs
    ) -> base_rollout.RolloutOutput:
        """Samples one completion per prompt.

        Prompts are tokenised as Tunix's samplers do (bos prepended when the tokenizer has one)
        and left-padded to max_prompt_length (or the next power of two above the longest).
        `tokens[i]` and `logprobs[i]` (f32, jengine's processed logprobs) include the stop token
        when one ended the completion: it was sampled, so the trainer scores it; `text[i]` is
        decoded without it, as Tunix's samplers' text is. `logits` is None.
        """
        if kwargs:
            raise TypeError(f"JengineRollout.generate got unsupported arguments {sorted(kwargs)}")
        sp = sampling_params(rollout_config, [self.eos_id()])
        self._sampling = sp
        seeds = request_seeds(rollout_config.seed, self._calls, len(prompts))
        self._calls += 1
        prompt_ids = [self._tokenize(p) for p in prompts]
        outs = self._engine.generate(prompt_ids, [dataclasses.replace(sp, seed=s) for s in seeds])
        tokens = [np.asarray(o.token_ids, np.int32) for o in outs]
        logprobs = [np.asarray(o.logprobs, np.float32) for o in outs]
        pad, key = self.pad_id(), _sampling_key(sp)
        for p, t, lp in zip(prompt_ids, tokens, logprobs):  # keyed as get_per_token_logps sees them
            self._recorded[(key, tuple(p), tuple(int(x) for x in t if x != pad))] = lp[t != pad]
        stops = set(sp.stop_token_ids)
        text = [self._tokenizer.decode((t[:-1] if len(t) and int(t[-1]) in stops else t).tolist())
                for t in tokens]
        return base_rollout.RolloutOutput(
            text=text,
            logits=None,
            tokens=tokens,
            left_padded_prompt_tokens=self._left_pad(prompt_ids, rollout_config.max_prompt_length),
            logprobs=logprobs if rollout_config.return_logprobs else None,
        )

    def get_per_token_logps(
        self, prompt_tokens: jax.Array, completion_tokens: jax.Array
    ) -> jax.Array:
        """f32[B, C]: jengine's processed logprob of each completion token (0.0 at pad tokens).

        prompt_tokens i32[B, P] (left-padded), completion_tokens i32[B, C] (right-padded), both
        with the tokenizer's pad id; pad tokens are skipped, as Tunix's own scoring skips them.
        Bitwise what `generate` returned for the same tokens under the same weights.
        """
        pad = self.pad_id()
        prompt_np, comp_np = np.asarray(prompt_tokens), np.asarray(completion_tokens)
        if prompt_np.ndim != 2 or comp_np.ndim != 2 or len(prompt_np) != len(comp_np):
            raise ValueError(f"prompt_tokens {prompt_np.shape} and completion_tokens "
                             f"{comp_np.shape} must be [B, P] and [B, C]")
        prompts = [[int(x) for x in row if x != pad] for row in prompt_np]
        comps = [[int(x) for x in row if x != pad] for row in comp_np]
        key = _sampling_key(self._sampling)
        values: list[np.ndarray | None] = [
            self._recorded.get((key, tuple(p), tuple(c))) if self.reuse_rollout_logprobs else None
            for p, c in zip(prompts, comps)
        ]
        todo = [i for i, v in enumerate(values) if v is None and comps[i]]
        if todo:
            scored = _score(self._engine, [prompts[i] for i in todo], [comps[i] for i in todo],
                            self._sampling)
            for i, s in zip(todo, scored):
                values[i] = np.asarray(s, np.float32)
        out = np.zeros(comp_np.shape, np.float32)
        for i, v in enumerate(values):
            if v is not None:
                out[i, comp_np[i] != pad] = v
        return jnp.asarray(out)

    def update_params(self, params: Any, filter_types: tuple[Any, ...] | None = None) -> None:
        """Serves `params` (the actor's Tunix NNX state, complete) from now on.

        Mapped (`to_jengine_params`, cast to the engine's dtype) and validated by
        `Engine.update_weights` before anything changes: a state that does not map, or holds
        non-finite values, raises and the old weights keep serving. LoRA states are refused.
        """
        if filter_types is not None and any(
            isinstance(t, type) and issubclass(t, nnx.LoRAParam) for t in filter_types
        ):
            raise ValueError("update_params with LoRA parameters: JengineRollout maps full Tunix "
                             "models only (merge the adapters into the base weights first)")
        # Tunix's sync_weights forbids host transfers on CPU; the engine's checks need a few bools.
        with jax.transfer_guard("allow"):
            new = to_jengine_params(params, self._config, self._engine.model.params["embed"].dtype)
            self._engine.update_weights(new, mode=self.update_mode)
        self._recorded.clear()

    def pad_id(self) -> int:
        return self._tokenizer.pad_id()

    def eos_id(self) -> int:
        return self._tokenizer.eos_id()

    def model(self) -> nnx.Module:
        """A Tunix model holding the weights the engine serves (new arrays, not the trainer's)."""
        state = jax.tree.map(lambda x: x, self._state_template)
        nnx.replace_by_pure_dict(state, to_tunix_state(self._engine.model.params, self._config))
        return nnx.merge(self._graphdef, state, self._rest)

    # -- jengine's side ---------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def policy_version(self) -> int:
        """Weight updates applied so far (0 = the weights it was built with)."""
        return self._engine.policy_version

    def _tokenize(self, text: str) -> list[int]:
        ids = list(self._tokenizer.encode(text))
        bos = self._tokenizer.bos_id()
        ids = self._tokenizer.dedup_bos_ids(([bos] if bos else []) + ids)
        return [int(t) for t in ids]

    def _left_pad(self, prompt_ids: list[list[int]], max_prompt_length: int) -> np.ndarray:
        longest = max(len(p) for p in prompt_ids)
        width = max_prompt_length
        if longest > max_prompt_length:  # as Tunix's samplers: the next power of two
            width = 1 << (longest - 1).bit_length()
        out = np.full((len(prompt_ids), width), self.pad_id(), np.int32)
        for i, p in enumerate(prompt_ids):
            out[i, width - len(p):] = p
        return out


# -- the trainer side ------------------------------------------------------------------------------


class JengineActor(nnx.Module):
    """A Tunix model whose forward is jengine's: Tunix's trainer-side logprobs are the rollout's.

    Call signature and return value are the Tunix model's (`common.compute_per_token_logps`):
    `actor(input_tokens i32[B, L], positions, cache=None, attention_mask=bool[B, L, L],
    segment_ids=None) -> (logits f32[B, L, V], None)`. The real tokens are those the attention
    mask's diagonal (or the 0/1 `segment_ids`) marks; `positions` are recomputed from them as
    Tunix computes them. logits are jengine's raw logits, `MASKED` where `sampling`'s filters drop
    the token, 0.0 at pad rows. There is no KV cache (decoding is JengineRollout's job).

    Args:
      model: the Tunix Qwen3 (dense or MoE) / Llama3 model to copy (its weights and submodules).
      sampling: the RolloutConfig (or SamplingParams) the rollout samples with: its top_k / top_p
        decide which tokens the processed distribution keeps. None: no filters.
      numerics: jengine's `Numerics`: the rollout engine's (`JengineRollout.engine.numerics`);
        None is the default engine's.
    """

    def __init__(
        self,
        model: nnx.Module,
        sampling: base_rollout.RolloutConfig | SamplingParams | None = None,
        *,
        numerics: Numerics | None = None,
    ):
        self.family = _family(model)
        self.jengine_config = jengine_config(model)
        clone = nnx.clone(model)
        graphdef, state = nnx.split(clone)
        clone = nnx.merge(graphdef, jax.tree.map(lambda x: jnp.array(x, copy=True), state))
        self.config = clone.config  # Tunix's config, as the Tunix model holds it
        self.embedder = clone.embedder
        self.layers = clone.layers
        self.final_norm = clone.final_norm
        if not self.jengine_config.tie_word_embeddings:
            self.lm_head = clone.lm_head
        if isinstance(sampling, base_rollout.RolloutConfig):
            sampling = sampling_params(sampling)
        self.sampling = sampling or SamplingParams()
        self.numerics = (numerics or Numerics()).resolved()

    def jengine_params(self) -> Params:
        """The actor's weights as jengine params (differentiable: built from the Variables)."""
        return to_jengine_params(nnx.state(self, nnx.Param), self.jengine_config)

    def per_token_logps(
        self,
        prompt_tokens: jax.Array,
        completion_tokens: jax.Array,
        pad_id: int,
        temperature: float | None = None,
        with_entropy: bool = False,
    ):
        """f32[B, C]: jengine's processed logprob of each completion token, bitwise the rollout's.

        The arguments and alignment of `tunix.rl.common.compute_per_token_logps` (prompt_tokens
        i32[B, P] left-padded, completion_tokens i32[B, C] right-padded; pad tokens skipped and
        scored 0.0), computed by `jengine.rl.token_logprobs` on the tokens packed without pads.
        Every prompt must hold a real token. Differentiable in the actor's params; with
        `with_entropy`, also f32[B, C] entropies of the processed distributions (no gradient).
        `temperature`, when given (Tunix passes the rollout's), must equal the actor's.
        """
        if temperature is not None and float(temperature) != self.sampling.temperature:
            raise ValueError(f"temperature={temperature} differs from the actor's sampling "
                             f"temperature {self.sampling.temperature}: build JengineActor with "
                             "the rollout's RolloutConfig")
        p = prompt_tokens.shape[1]
        tokens = jnp.concatenate([prompt_tokens, completion_tokens], axis=1).astype(jnp.int32)
        real = tokens != pad_id
        order = jnp.argsort(~real, axis=1, stable=True)  # real tokens first, in order
        packed = jnp.where(jnp.take_along_axis(real, order, axis=1),
                           jnp.take_along_axis(tokens, order, axis=1), pad_id)
        out = _token_logprobs(
            self.jengine_params(), self.jengine_config, packed, real[:, :p].sum(1),
            real[:, p:].sum(1), self.sampling, self.numerics, with_entropy,
        )
        # completion token j sits at packed index cumsum(real) - 1; its value is that column - 1
        col = jnp.clip(jnp.cumsum(real, axis=1)[:, p:] - 2, 0, tokens.shape[1] - 2)
        back = [jnp.where(real[:, p:], jnp.take_along_axis(v, col, axis=1), 0.0)
                for v in (out if with_entropy else (out,))]
        return tuple(back) if with_entropy else back[0]

    def __call__(
        self,
        input_tokens: jax.Array,
        positions: jax.Array | None = None,
        cache: Any = None,
        attention_mask: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, None]:
        del positions  # recomputed from the mask, as Tunix's build_positions_from_mask does
        if cache is not None:
            raise ValueError("JengineActor has no KV cache (cache must be None): it is the "
                             "trainer-side model; decode with JengineRollout")
        tokens = jnp.asarray(input_tokens, jnp.int32)
        if segment_ids is not None:
            real = jnp.asarray(segment_ids) != 0
        elif attention_mask is not None and attention_mask.ndim == 3:
            real = jnp.diagonal(attention_mask, axis1=1, axis2=2).astype(bool)
        else:
            real = jnp.ones(tokens.shape, bool)
        raw = _raw_logits(self.jengine_params(), self.jengine_config, tokens, real, self.numerics)
        sp = self.sampling
        if sp.temperature > 0 and (sp.top_k > 0 or sp.top_p < 1.0 or sp.min_p > 0):
            raw = jnp.where(_kept(jax.lax.stop_gradient(raw), sp), raw, MASKED)
        return raw, None


# -- Tunix's GRPO objective on the actor's exact logprobs ------------------------------------------


_tunix_grpo_loss_fn = None


def grpo_loss_fn(model, train_example, algo_config, pad_id, eos_id, **kwargs):
    """Tunix 0.1.7's GRPO loss (`tunix.rl.algo_core.grpo_loss_fn`) for a `JengineActor`, with the
    policy's per-token logprobs from `JengineActor.per_token_logps` (bitwise the rollout's); any
    other model goes to Tunix's own function unchanged.

    Registered as the "grpo" policy loss when this module is imported: Tunix's trainer scores the
    policy inside this function, whose log-softmax XLA compiles in its own way, so the exact
    numbers have to be computed here. The objective, its options (loss_algo 'gspo-token',
    epsilon / epsilon_high / epsilon_c, sampler_is_weights, beta with kl_loss_mode and
    kl_clamp_value, loss_agg_mode) and its aux keys are Tunix's; the "entropy" aux is the
    entropy of the processed (filtered) distributions.
    """
    if not isinstance(model, JengineActor):
        return _tunix_grpo_loss_fn(model, train_example, algo_config, pad_id, eos_id, **kwargs)
    from tunix.rl import algo_core, common

    if getattr(train_example, "segment_ids", None) is not None:
        raise ValueError("JengineActor does not take packed sequences (segment_ids)")
    masked_mean = algo_core.masked_mean
    epsilon = algo_config.epsilon
    epsilon_high = algo_config.epsilon_high if hasattr(algo_config, "epsilon_high") else epsilon
    epsilon_c = getattr(algo_config, "epsilon_c", None)
    agg = algo_config.loss_agg_mode
    mask = train_example.completion_mask
    logps, entropy = model.per_token_logps(
        train_example.prompt_ids, train_example.completion_ids, pad_id,
        temperature=algo_config.temperature, with_entropy=True,
    )
    logps = logps.astype(jnp.float32)
    advantages = train_example.advantages.astype(jnp.float32)
    if train_example.old_per_token_logps is None:
        old = jax.lax.stop_gradient(logps)
    else:
        old = train_example.old_per_token_logps.astype(jnp.float32)
    log_ratio = logps - old
    ppo_kl = masked_mean(-log_ratio, mask)
    log_ratio = jnp.clip(log_ratio, max=20.0, min=-20.0)
    if algo_config.loss_algo == "gspo-token":
        seq = (log_ratio * mask).sum(axis=-1) / jnp.clip(mask.sum(-1), min=1)
        log_ratio = logps - jax.lax.stop_gradient(logps) + jax.lax.stop_gradient(seq)[:, None]
        log_ratio = jnp.clip(log_ratio, max=10.0)
    is_ratio = jnp.exp(log_ratio)
    adv = advantages if advantages.ndim == 2 else advantages[:, None]
    pg_loss_1 = -adv * is_ratio
    pg_loss_2 = -adv * jnp.clip(is_ratio, 1 - epsilon, 1 + epsilon_high)
    per_token_loss = jnp.maximum(pg_loss_1, pg_loss_2).astype(jnp.float32)
    clipped_fraction = masked_mean(jnp.greater(pg_loss_2, pg_loss_1), mask)
    pg_loss_3 = -epsilon_c * adv if epsilon_c is not None else per_token_loss
    lower = ((per_token_loss > pg_loss_3) & (adv < 0.0)).astype(jnp.float32)
    pg_clipfrac_lower = common.aggregate_loss(lower, mask, agg)
    per_token_loss = jnp.where(adv < 0.0, jnp.minimum(pg_loss_3, per_token_loss), per_token_loss)
    sampler_is_weights = getattr(train_example, "sampler_is_weights", None)
    if sampler_is_weights is not None:
        per_token_loss = per_token_loss * sampler_is_weights.astype(jnp.float32)
    loss = common.aggregate_loss(per_token_loss, mask, agg)
    adv_b = jnp.broadcast_to(adv, mask.shape)
    aux = {
        "kl": 0.0,
        "kl_loss": 0.0,
        "pg_loss": loss,
        "pg_clipfrac": clipped_fraction,
        "ppo_kl": ppo_kl,
        "pg_clipfrac_lower": pg_clipfrac_lower,
        "is_ratio/mean": masked_mean(is_ratio, mask),
        "is_ratio/max": jnp.max(jnp.where(mask > 0, is_ratio, 0.0)),
        "is_ratio/min": jnp.min(jnp.where(mask > 0, is_ratio, jnp.inf)),
        "log_ratio/abs_mean": masked_mean(jnp.abs(log_ratio), mask),
        "pg_loss/unclipped_mean": masked_mean(pg_loss_1, mask),
        "pg_loss/clipped_mean": masked_mean(pg_loss_2, mask),
        "advantage/abs_mean": masked_mean(jnp.abs(adv_b), mask),
        "advantage/max": jnp.max(jnp.where(mask > 0, adv_b, -jnp.inf)),
        "advantage/min": jnp.min(jnp.where(mask > 0, adv_b, jnp.inf)),
        "advantage/nonzero_frac": masked_mean((jnp.abs(adv_b) > 1e-8).astype(jnp.float32), mask),
    }
    if sampler_is_weights is not None:
        sis = sampler_is_weights.astype(jnp.float32)
        aux["sampler_is/weight_mean"] = masked_mean(sis, mask)
        aux["sampler_is/weight_min"] = jnp.min(jnp.where(mask > 0, sis, jnp.inf))
    else:
        aux["sampler_is/weight_mean"] = jnp.float32(1.0)
        aux["sampler_is/weight_min"] = jnp.float32(1.0)
    if train_example.ref_per_token_logps is not None:
        kl = common.compute_kl_divergence(logps, train_example.ref_per_token_logps,
                                          algo_config.kl_loss_mode,
                                          clamp_value=algo_config.kl_clamp_value)
        aux["kl"] = jnp.astype((kl * mask).sum() / jnp.clip(mask.sum(), min=1), jnp.float32)
        kl_loss = common.aggregate_loss(kl, mask, agg)
        aux["kl_loss"] = kl_loss
        if algo_config.beta is not None and algo_config.beta != 0.0:
            loss = loss + algo_config.beta * kl_loss
    aux["entropy"] = common.aggregate_loss(entropy, mask, agg)
    return loss, aux


def _register() -> None:
    global _tunix_grpo_loss_fn
    from tunix.rl import algo_core, function_registry

    if _tunix_grpo_loss_fn is None:
        _tunix_grpo_loss_fn = algo_core.grpo_loss_fn
        function_registry.register_policy_loss_fn("grpo")(grpo_loss_fn)


_register()
