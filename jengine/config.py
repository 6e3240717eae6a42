"""Frozen, validated configuration: the model's shape, the engine's knobs, a request's sampling,
and the numerics that decide a logprob's bits.

Every dataclass here is frozen and keyword-only (hashable: usable as a static jit argument).
`__post_init__` raises a `ValueError` (or `TypeError`) naming the field and the bad value. No jax
here: the host layer builds on this module alone. `SamplingParams` and `EngineConfig` fields carry
their command-line help (and choices) as metadata; `jengine.cli` generates its flags from them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import typing
from collections.abc import Mapping
from typing import Any

LOGPROBS_MODES = ("processed_logprobs", "raw_logprobs", "processed_logits", "raw_logits")
NUMERICS_MODES = ("invariant", "fast")
KERNEL_BACKENDS = ("auto", "cpu", "pallas", "pallas_interpret", "tpu_interpret")
LM_HEAD_DTYPES = ("float32", "bfloat16", "model")
PARAM_DTYPES = ("float32", "bfloat16")
ROPE_TYPES = ("llama3", "linear")
ACTIVATIONS = ("silu", "gelu_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")
MIN_TEMPERATURE = 1e-5  # smallest nonzero temperature; below it raw/T can overflow fp32

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")  # package data


def _field(default: Any = dataclasses.MISSING, help: str = "", **metadata: Any) -> Any:
    """A dataclass field with its command-line help and its checks: optional `lo` / `hi` bounds,
    `choices`, `path` (a str that may be an os.PathLike), and the `flag` name it has on the
    command line (`_validate` enforces the checks)."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _validate(obj: Any, skip: tuple[str, ...] = ()) -> None:
    """Checks every field of a config dataclass but `skip` against its type and its `_field`
    metadata; the error names the field and the bad value."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        name, value, kind, m = f.name, getattr(obj, f.name), hints[f.name], f.metadata
        args = typing.get_args(kind)
        if type(None) in args:  # X | None
            if value is None:
                continue
            (kind,) = [a for a in args if a is not type(None)]
        if "choices" in m:
            check_choice(name, value, m["choices"])
        elif kind is bool and not isinstance(value, bool):
            raise TypeError(f"{name}={value!r} must be a bool")
        elif kind is int:
            _check_int(name, value, m.get("lo"), m.get("hi"))
        elif kind is float:
            _check_float(name, value, m.get("lo"), m.get("hi"))
        elif kind == tuple[int, ...]:
            if not isinstance(value, tuple):
                raise TypeError(f"{name}={value!r} must be a tuple of ints")
            for t in value:
                _check_int(f"{name}[...]", t, lo=0)
        elif kind == tuple[str, ...]:
            if not isinstance(value, tuple) or not all(isinstance(t, str) and t for t in value):
                raise TypeError(f"{name}={value!r} must be a tuple of non-empty strs")
        elif kind is str and not isinstance(value, (str, os.PathLike) if m.get("path") else str):
            raise TypeError(f"{name}={value!r} must be a str")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> None:
    if not _is_int(value):
        raise TypeError(f"{name}={value!r} must be an int")
    if lo is not None and value < lo:
        raise ValueError(f"{name}={value!r} must be >= {lo}")
    if hi is not None and value > hi:
        raise ValueError(f"{name}={value!r} must be <= {hi}")


def _check_float(name: str, value: Any, lo: float | None = None, hi: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}={value!r} must be a number")
    if not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be finite")
    if lo is not None and value < lo:
        raise ValueError(f"{name}={value!r} must be >= {lo}")
    if hi is not None and value > hi:
        raise ValueError(f"{name}={value!r} must be <= {hi}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} must be one of {choices}")


class _Replace:
    def replace(self, **changes: Any) -> typing.Self:
        """A copy with `changes` (validated again)."""
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """RoPE frequency scaling as HF configs state it: `rope_type="llama3"` (Llama 3.x, the band
    fields required) or `"linear"` (every inverse frequency divided by `factor`; Gemma 3 4B+ on its
    full-attention layers)."""

    factor: float
    rope_type: str = "llama3"
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None

    def __post_init__(self) -> None:
        check_choice("rope_scaling.rope_type", self.rope_type, ROPE_TYPES)
        _check_float("rope_scaling.factor", self.factor, lo=1.0)
        if self.rope_type == "linear":
            return
        _check_float("rope_scaling.low_freq_factor", self.low_freq_factor, lo=0.0)
        _check_float("rope_scaling.high_freq_factor", self.high_freq_factor, lo=0.0)
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"rope_scaling.high_freq_factor={self.high_freq_factor} must exceed "
                             f"low_freq_factor={self.low_freq_factor}")  # fmt: skip
        _check_int("rope_scaling.original_max_position_embeddings",
                   self.original_max_position_embeddings, lo=1)  # fmt: skip


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig(_Replace):
    """Shape of a decoder-only transformer (Llama 3.x, Qwen2/2.5, Qwen3, Gemma 2 and 3 families).

    Families are config flags: `qkv_bias` (Qwen2), `qk_norm` (Qwen3, Gemma 3: per-head RMSNorm on
    q and k before RoPE), `tie_word_embeddings` (the lm_head is the embedding matrix), and Gemma's:
      norm_unit_offset: every RMSNorm scales by `(1 + w)` in fp32, then casts to the activation
        dtype (weights stored zero-centred, as HF stores them).
      post_norms: a norm on the attention output and on the MLP output before each residual add
        (four norms per layer).
      scale_embeddings: the embedding output times sqrt(hidden_size), the scale cast to the
        weights' dtype first (bf16 makes 55.4256 into 55.5, as HF does).
      hidden_act: the MLP's gate activation, 'silu' or 'gelu_tanh'.
      query_pre_attn_scalar: attention scores scale by its ** -0.5 (None: head_dim ** -0.5).
      attn_logit_softcap, final_logit_softcap: `cap * tanh(x / cap)` on attention scores / logits.
      layer_types: per layer 'full_attention' or 'sliding_attention' (None: all full); a sliding
        layer's query at position i sees keys j with i - sliding_window < j <= i.
      rope_local_theta: RoPE base of the sliding layers (None: rope_theta). `rope_scaling` applies
        to the full-attention layers only.

    Mixture of experts (Qwen3-MoE, Mixtral, Qwen2-MoE; `num_experts=0`: every layer dense):
      num_experts, num_experts_per_tok (k): each token of a sparse layer goes to the k experts its
        router (fp32 softmax over `num_experts` logits, ties to the lower index) ranks highest.
      moe_intermediate_size: each expert's SwiGLU width (Mixtral's experts: intermediate_size).
      norm_topk_prob: the k gate weights renormalised to sum to 1 (Qwen3-MoE's flag; Mixtral's
        always), else the top-k softmax probabilities as they are (Qwen2-MoE).
      decoder_sparse_step, mlp_only_layers: layer i is sparse when (i + 1) is a multiple of the
        step and i is not in mlp_only_layers (Qwen's rule); the others keep the dense
        `intermediate_size` MLP (`is_sparse`).
      shared_expert_intermediate_size: > 0 adds Qwen2-MoE's shared expert to every sparse layer
        (a dense SwiGLU MLP of that width, scaled by sigmoid of a [1, hidden] gate).
    """

    vocab_size: int = _field(lo=1)
    hidden_size: int = _field(lo=1)
    intermediate_size: int = _field(lo=1)
    num_layers: int = _field(lo=1)
    num_heads: int = _field(lo=1)
    num_kv_heads: int = _field(lo=1)
    head_dim: int = _field(lo=1)
    rope_theta: float = _field(10000.0, lo=1e-6)
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = _field(1e-6, lo=0.0)
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = _field(4096, lo=1)
    dtype: str = _field("float32", choices=PARAM_DTYPES)
    eos_token_ids: tuple[int, ...] = ()  # these two are checked against vocab_size
    bos_token_id: int | None = None
    name: str = "model"
    hidden_act: str = _field("silu", choices=ACTIVATIONS)
    norm_unit_offset: bool = False
    post_norms: bool = False
    scale_embeddings: bool = False
    query_pre_attn_scalar: float | None = _field(None, lo=1e-6)
    attn_logit_softcap: float | None = _field(None, lo=1e-6)
    final_logit_softcap: float | None = _field(None, lo=1e-6)
    sliding_window: int | None = _field(None, lo=1)
    layer_types: tuple[str, ...] | None = None
    rope_local_theta: float | None = _field(None, lo=1e-6)
    num_experts: int = _field(0, lo=0)
    num_experts_per_tok: int = _field(0, lo=0)
    moe_intermediate_size: int = _field(0, lo=0)
    norm_topk_prob: bool = False
    decoder_sparse_step: int = _field(1, lo=1)
    mlp_only_layers: tuple[int, ...] = ()
    shared_expert_intermediate_size: int = _field(0, lo=0)

    def __post_init__(self) -> None:
        _validate(self, skip=("eos_token_ids", "bos_token_id"))
        self._check_experts()
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")  # fmt: skip
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even (RoPE rotates pairs)")
        if not isinstance(self.eos_token_ids, tuple):
            raise TypeError(f"eos_token_ids={self.eos_token_ids!r} must be a tuple of ints")
        for t in self.eos_token_ids:
            if not _is_int(t) or not 0 <= t < self.vocab_size:
                raise ValueError(f"eos_token_ids contains {t!r}, outside [0, {self.vocab_size})")
        bos = self.bos_token_id
        if bos is not None and (not _is_int(bos) or not 0 <= bos < self.vocab_size):
            raise ValueError(f"bos_token_id={bos!r} must be None or in [0, {self.vocab_size})")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise TypeError(f"rope_scaling={self.rope_scaling!r} must be a RopeScaling")
        if self.layer_types is not None:
            if not isinstance(self.layer_types, tuple) or len(self.layer_types) != self.num_layers:
                raise ValueError(f"layer_types={self.layer_types!r} must be a tuple of num_layers="
                                 f"{self.num_layers} entries from {LAYER_TYPES}")  # fmt: skip
            for t in self.layer_types:
                check_choice("layer_types[...]", t, LAYER_TYPES)
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError(f"layer_types={self.layer_types!r} has sliding layers but "
                                 "sliding_window=None")  # fmt: skip

    def _check_experts(self) -> None:
        for t in self.mlp_only_layers:
            if not 0 <= t < self.num_layers:
                raise ValueError(f"mlp_only_layers contains {t}, outside [0, num_layers="
                                 f"{self.num_layers})")  # fmt: skip
        if self.num_experts == 0:
            moe = {"num_experts_per_tok": self.num_experts_per_tok,
                   "moe_intermediate_size": self.moe_intermediate_size,
                   "shared_expert_intermediate_size": self.shared_expert_intermediate_size}
            if set_fields := {k: v for k, v in moe.items() if v}:
                raise ValueError(f"{set_fields} set but num_experts=0 (a dense model)")
            return
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, "
                             f"num_experts={self.num_experts}]")  # fmt: skip
        if self.moe_intermediate_size < 1:
            raise ValueError(f"moe_intermediate_size={self.moe_intermediate_size} must be >= 1 "
                             f"when num_experts={self.num_experts}")  # fmt: skip

    def is_sparse(self, layer: int) -> bool:
        """Whether layer `layer`'s MLP is the mixture of experts (Qwen's rule; see the doc)."""
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)  # fmt: skip

    @property
    def sparse_layers(self) -> tuple[int, ...]:
        """The layers whose MLP is the mixture of experts, in order."""
        return tuple(i for i in range(self.num_layers) if self.is_sparse(i))

    def is_sliding(self, layer: int) -> bool:
        """Whether layer `layer` attends through the sliding window."""
        return self.layer_types is not None and self.layer_types[layer] == "sliding_attention"

    @property
    def attn_scale(self) -> float:
        """Attention score scale: query_pre_attn_scalar ** -0.5, else 1 / sqrt(head_dim)."""
        if self.query_pre_attn_scalar is None:
            return 1.0 / math.sqrt(self.head_dim)
        return self.query_pre_attn_scalar**-0.5

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Builds from jengine's own JSON form, or from a Hugging Face `config.json` dict."""
        if "hidden_size" in d and "num_attention_heads" in d:
            return cls._from_hf(d)
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(d) - known):
            raise ValueError(f"unknown ModelConfig fields {unknown}; known: {sorted(known)}")
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        for field in ("eos_token_ids", "layer_types", "mlp_only_layers"):
            if d.get(field) is not None:
                d[field] = tuple(d[field])
        return cls(**d)

    @classmethod
    def _from_hf(cls, d: Mapping[str, Any]) -> ModelConfig:
        archs = list(d.get("architectures") or [])
        model_type = d.get("model_type", "")
        supported = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                     "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
                     "gemma3_text": "Gemma3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                     "qwen2_moe": "Qwen2MoeForCausalLM",
                     "mixtral": "MixtralForCausalLM"}  # fmt: skip
        if model_type not in supported:  # the architecture names the family
            by_arch = {a: t for t, a in supported.items()}
            model_type = next((by_arch[a] for a in archs if a in by_arch), model_type)
        if model_type not in supported and not set(archs) & set(supported.values()):
            raise ValueError(f"unsupported architecture model_type={model_type!r} architectures="
                             f"{archs}; jengine supports {sorted(supported.values())}")  # fmt: skip
        gemma = {"gemma2": 2, "Gemma2ForCausalLM": 2, "gemma3_text": 3, "Gemma3ForCausalLM": 3}
        gemma = next((gemma[k] for k in [model_type, *archs] if k in gemma), None)
        heads = d["num_attention_heads"]
        rs = d.get("rope_scaling") or d.get("rope_parameters")
        theta = d.get("rope_theta")
        if theta is None and rs:
            theta = rs.get("rope_theta")
        eos = d.get("eos_token_id", 1 if gemma else None)  # Gemma's defaults: EOS 1, BOS 2
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        torch_dtype = d.get("torch_dtype") or d.get("dtype") or "float32"
        family: dict[str, Any] = {"qk_norm": model_type in ("qwen3", "qwen3_moe"),
                                  **_moe_fields(d, model_type)}  # fmt: skip
        if gemma:
            family = _gemma_fields(d, gemma)
            rs = family.pop("rope_scaling")
            theta = family.pop("rope_theta")
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
            num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rope_theta=float(theta if theta is not None else 10000.0),
            rope_scaling=_rope_scaling(rs), rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            qkv_bias=model_type in ("qwen2", "qwen2_moe") or bool(d.get("attention_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", gemma is not None)),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            dtype="bfloat16" if torch_dtype == "bfloat16" else "float32", eos_token_ids=eos_ids,
            bos_token_id=d.get("bos_token_id", 2 if gemma else None),
            name=d.get("_name_or_path") or model_type, **family,
        )  # fmt: skip

    @classmethod
    def from_json(cls, path: str) -> ModelConfig:
        """Reads a JSON file: jengine's form or a Hugging Face `config.json`."""
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(d)

    @classmethod
    def named(cls, name: str) -> ModelConfig:
        """A config shipped with the package (`configs/`): 'tiny', 'qwen2.5-0.5b', 'qwen3-0.6b',
        'llama-3.2-1b', ..."""
        path = os.path.join(CONFIGS_DIR, f"{name}.json")
        if not os.path.exists(path):
            have = sorted(p[:-5] for p in os.listdir(CONFIGS_DIR) if p.endswith(".json"))
            raise ValueError(f"no shipped config named {name!r}; available: {have}")
        return cls.from_json(path)


def _rope_scaling(rs: Mapping[str, Any] | None) -> RopeScaling | None:
    """An HF `rope_scaling` / `rope_parameters` dict as a RopeScaling (None: no scaling)."""
    kind = rs.get("rope_type", rs.get("type")) if rs else None
    if kind in (None, "default"):
        return None
    if kind == "linear":
        return RopeScaling(rope_type="linear", factor=float(rs["factor"]))
    if kind == "llama3":
        return RopeScaling(
            factor=float(rs["factor"]), low_freq_factor=float(rs["low_freq_factor"]),
            high_freq_factor=float(rs["high_freq_factor"]),
            original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
        )  # fmt: skip
    raise ValueError(f"unsupported rope_scaling {dict(rs)!r}: jengine supports {ROPE_TYPES}, none")


def _moe_fields(d: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    """Mixture-of-experts fields of an HF config (none for a dense family).

    Qwen3-MoE / Qwen2-MoE: `num_experts` (transformers 5 writes it `num_local_experts`),
    `moe_intermediate_size`, `norm_topk_prob`, `decoder_sparse_step`, `mlp_only_layers`; Qwen2-MoE
    adds `shared_expert_intermediate_size`. Mixtral: `num_local_experts` experts of
    `intermediate_size`, every layer sparse, top-k always renormalised; a `sliding_window` makes
    every layer sliding, as its attention is."""
    if model_type == "mixtral":
        window = d.get("sliding_window")
        return dict(num_experts=d["num_local_experts"],
                    num_experts_per_tok=d["num_experts_per_tok"],
                    moe_intermediate_size=d["intermediate_size"], norm_topk_prob=True,
                    sliding_window=window,
                    layer_types=("sliding_attention",) * d["num_hidden_layers"] if window else None)
    if model_type not in ("qwen3_moe", "qwen2_moe"):
        return {}
    experts = d.get("num_experts", d.get("num_local_experts"))
    shared = d.get("shared_expert_intermediate_size") or 0 if model_type == "qwen2_moe" else 0
    return dict(num_experts=experts, num_experts_per_tok=d["num_experts_per_tok"],
                moe_intermediate_size=d["moe_intermediate_size"],
                norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                decoder_sparse_step=d.get("decoder_sparse_step") or 1,
                mlp_only_layers=tuple(d.get("mlp_only_layers") or ()),
                shared_expert_intermediate_size=shared)  # fmt: skip


GEMMA_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh", "silu": "silu"}
# What every Gemma (2 and 3, HF or GGUF) sets in the same way.
GEMMA_FLAGS = dict(norm_unit_offset=True, post_norms=True, scale_embeddings=True)


def gemma_layer_types(num_layers: int, pattern: int) -> tuple[str, ...]:
    """Every `pattern`-th layer full attention, the others sliding."""
    return tuple("sliding_attention" if (i + 1) % pattern else "full_attention"
                 for i in range(num_layers))  # fmt: skip


def _gemma_fields(d: Mapping[str, Any], version: int) -> dict[str, Any]:
    """Gemma 2 / Gemma 3 family fields with transformers' defaults (configuration_gemma{2,3}.py).

    Gemma 2: a sliding layer every other layer, one RoPE base, both soft caps (default 50 / 30).
    Gemma 3: qk-norm, every 6th layer full, RoPE per layer type in two spellings: transformers 5's
    `rope_parameters` ({"full_attention": {...}, "sliding_attention": {...}}) or the older
    `rope_theta` + `rope_local_base_freq` + `rope_scaling` (full layers only); its
    `attn_logit_softcapping` is ignored, as transformers' Gemma 3 attention ignores it.
    """
    act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in GEMMA_ACTIVATIONS:
        raise ValueError(f"hidden_activation={act!r}: jengine supports {sorted(GEMMA_ACTIVATIONS)}")
    if d.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention=True is not supported (causal decoders only)")
    pattern = d.get("sliding_window_pattern", 6) if version == 3 else 2
    layer_types = d.get("layer_types") or gemma_layer_types(d["num_hidden_layers"], pattern)
    rp = d.get("rope_parameters") or {}
    if "full_attention" in rp or "sliding_attention" in rp:
        full, local = rp.get("full_attention") or {}, rp.get("sliding_attention") or {}
    else:
        full = {**rp, **(d.get("rope_scaling") or {})}
        full["rope_theta"] = d.get("rope_theta") or rp.get("rope_theta")
        local = {"rope_theta": d.get("rope_local_base_freq")}
    if _rope_scaling(local) is not None:
        raise ValueError(f"rope_parameters.sliding_attention={local!r}: must be unscaled")
    default_theta, default_caps = (1e6, (None, None)) if version == 3 else (1e4, (50.0, 30.0))
    keys = ("attn_logit_softcapping", "final_logit_softcapping")
    caps = [d.get(key, default) for key, default in zip(keys, default_caps)]
    if version == 3:
        caps[0] = None
    return dict(
        rope_theta=full.get("rope_theta") or default_theta, rope_scaling=full,
        rope_local_theta=float(local.get("rope_theta") or 1e4) if version == 3 else None,
        qk_norm=version == 3, hidden_act=GEMMA_ACTIVATIONS[act], **GEMMA_FLAGS,
        query_pre_attn_scalar=float(d.get("query_pre_attn_scalar") or 256),
        attn_logit_softcap=None if caps[0] is None else float(caps[0]),
        final_logit_softcap=None if caps[1] is None else float(caps[1]),
        sliding_window=d.get("sliding_window") or 4096, layer_types=tuple(layer_types),
    )  # fmt: skip


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How one request samples, and what its returned logprobs mean.

    The processing order is vLLM V1's: temperature, then min-p, then top-k, then top-p; masked
    tokens get -inf and the processed distribution is renormalised over the survivors.
    `temperature=0` is greedy (argmax of the raw logits); its processed distribution is the raw one.
    `seed=None` derives the request's seed from the engine seed and the request's arrival index.
    Stops as in vLLM: EOS (unless `ignore_eos`), a token of `stop_token_ids` or a string of `stop`
    ends the request with finish_reason 'stop', the token that did it kept in `token_ids`; the
    output text leaves out a stop token's text and is cut before a stop string (both kept with
    `include_stop_str_in_output`); `RequestOutput.stop_reason` names the stop token id or string.
    """

    temperature: float = _field(1.0, "Sampling temperature; 0 is greedy.", lo=0.0)
    top_k: int = _field(0, "Top-k filter; 0 keeps every token.", lo=0, hi=2**31 - 1)  # int32
    top_p: float = _field(1.0, "Top-p (nucleus) filter in (0, 1]; 1 keeps every token.", hi=1.0)
    min_p: float = _field(0.0, "Min-p filter in [0, 1]; 0 keeps every token.", lo=0.0, hi=1.0)
    max_tokens: int = _field(16, "Most new tokens per request.", lo=1)
    seed: int | None = _field(
        None, "Request seed (request i of a command gets seed + i); unset: derived from the "
        "engine seed and the arrival order.", lo=0, hi=2**31 - 1,
    )  # fmt: skip
    stop_token_ids: tuple[int, ...] = _field((), "Token ids that end a request (comma-separated).")
    stop: tuple[str, ...] = _field(
        (), "Stop strings (comma-separated): the request ends at the token that completes one in "
        "its generated text (which is cut before it); needs an engine with a tokenizer.",
    )  # fmt: skip
    include_stop_str_in_output: bool = _field(False, "Keep the stop string in the output text.")
    ignore_eos: bool = _field(False, "Keep generating past the model's EOS tokens.")
    logprobs: int = _field(0, "Also return the n best (id, value) pairs per token (0-20).",
                           flag="top_logprobs", lo=0, hi=20)  # fmt: skip

    def __post_init__(self) -> None:
        _validate(self)
        if 0.0 < self.temperature < MIN_TEMPERATURE:  # raw / T overflows fp32: NaN logprobs
            raise ValueError(f"temperature={self.temperature!r} must be 0 (greedy) or >= "
                             f"{MIN_TEMPERATURE}")  # fmt: skip
        if self.top_p <= 0.0:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Numerics(_Replace):
    """Everything besides params, tokens and sampling that decides a logprob's bits.

    The engine resolves one value from its config (`Engine.numerics`); `jengine.score`,
    `jengine.rl.token_logprobs` and `diagnostics.parity_report` take that same value.

    Attributes:
      mode: 'invariant' (batch-invariant kernels: the bitwise contract) or 'fast' (plain XLA).
      backend: kernel lowering; 'auto' resolves by platform (`resolved`): 'cpu' (fixed-tile plain
        JAX) on CPU, 'pallas' on TPU/GPU; 'pallas_interpret' runs the Pallas kernels in the
        interpreter (tests).
      column_blocks: every matmul's output columns, the lm_head's vocabulary and attention's heads
        are computed in this many fixed blocks, so any tensor-parallel size dividing it gives the
        same bits (`jengine.sharding`). 1 is the unblocked single-device path.
      lm_head_dtype: 'float32' (hidden state and head weight upcast, fp32 accumulation),
        'bfloat16', or 'model' (the params' dtype).
    """

    mode: str = "invariant"
    backend: str = "auto"
    column_blocks: int = 1
    lm_head_dtype: str = "float32"

    def __post_init__(self) -> None:
        check_choice("numerics", self.mode, NUMERICS_MODES)
        check_choice("kernel_backend", self.backend, KERNEL_BACKENDS)
        _check_int("column_blocks", self.column_blocks, lo=1)
        check_choice("lm_head_dtype", self.lm_head_dtype, LM_HEAD_DTYPES)

    def resolved(self) -> Numerics:
        """This value with backend 'auto' replaced by the platform's ('cpu' or 'pallas')."""
        if self.backend != "auto":
            return self
        import jax  # only here: the rest of this module is host-side

        backend = "cpu" if jax.default_backend() == "cpu" else "pallas"
        return dataclasses.replace(self, backend=backend)


def check_column_blocks(column_blocks: int, tensor_parallel_size: int) -> None:
    if column_blocks % tensor_parallel_size:
        raise ValueError(
            f"column_blocks={column_blocks} must be a multiple of tensor_parallel_size="
            f"{tensor_parallel_size}: every device computes column_blocks / tensor_parallel_size "
            "whole blocks"
        )


def resolve_numerics(numerics: Numerics | None, tensor_parallel_size: int = 1) -> Numerics:
    """The one place a numerics value is resolved: `numerics` (checked against the tensor-parallel
    size) or, when None, the defaults with column_blocks = tensor_parallel_size; backend resolved.
    """
    if numerics is None:
        numerics = Numerics(column_blocks=tensor_parallel_size)
    if not isinstance(numerics, Numerics):
        raise TypeError(f"numerics={numerics!r} must be a jengine.Numerics (for an engine's bits "
                        "pass engine.numerics)")  # fmt: skip
    check_column_blocks(numerics.column_blocks, tensor_parallel_size)
    return numerics.resolved()


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineConfig(_Replace):
    """How the engine runs. The numerics fields resolve to one `Numerics` (`resolved_numerics`,
    exposed as `Engine.numerics`); score with that value to get the engine's bits."""

    page_size: int = _field(16, "Tokens per KV page (a power of two; changes no output bit).", lo=1)
    num_pages: int | None = _field(
        None, "KV pages per data-parallel replica; unset: enough for max_num_seqs sequences of "
        "max_model_len tokens (capped by device memory).", lo=1,
    )  # fmt: skip
    max_num_seqs: int = _field(64, "Most sequences in one step.", lo=1)
    max_num_batched_tokens: int = _field(
        512, "Token budget of one step (prefill chunks + decode tokens; its largest bucket).", lo=1)
    max_model_len: int | None = _field(
        None, "Longest prompt + completion; unset: the model's max positions.", lo=2)
    min_token_bucket: int = _field(16, "Smallest compiled step in tokens (a power of two; changes "
                                   "no bit). On CPU, 2 speeds up steps of 1-15 tokens (a "
                                   "rollout's tail) for 3 more buckets to compile.", lo=1)
    logprobs_mode: str = _field("processed_logprobs", "Which number is returned per token (vLLM's "
                                "names).", choices=LOGPROBS_MODES)
    lm_head_dtype: str = _field("float32", "lm_head compute dtype.", choices=LM_HEAD_DTYPES)
    enable_prefix_caching: bool = _field(True, "Reuse KV pages of full identical prefixes (keyed "
                                         "by policy version).", flag="prefix_caching")
    tensor_parallel_size: int = _field(1, "Devices each model replica is split over.", lo=1)
    data_parallel_size: int = _field(1, "Model replicas, each with its own KV pool.", lo=1)
    seed: int = _field(0, "Engine seed: a request without its own seed gets fold(seed, arrival "
                       "index).", flag="engine_seed", lo=0)
    numerics: str = _field("invariant", "invariant: batch-invariant kernels (the bitwise "
                           "contract); fast: plain XLA.", choices=NUMERICS_MODES)
    kernel_backend: str = _field("auto", "Kernel lowering; auto picks cpu on CPU, pallas on "
                                 "TPU/GPU.", choices=KERNEL_BACKENDS)
    check_finite: bool = _field(
        True, "Finish requests whose logits are non-finite with finish_reason='error'.")
    trace_path: str | None = _field(
        None, "Write the JSONL step trace here (see jengine.diagnostics).", flag="trace", path=True)
    column_blocks: int | None = _field(
        None, "Tensor-parallel-invariant numerics: compute in this many column blocks, so any "
        "tensor_parallel_size dividing it gives the same bits; unset: tensor_parallel_size.", lo=1,
    )  # fmt: skip
    verify_fraction: float = _field(
        0.0, "Runtime parity guard: re-score this fraction of finished requests with the "
        "trainer-side path (jengine.score under the engine's numerics); a mismatch means a bug "
        "or a hardware fault (counted in stats, written to the trace).", lo=0.0, hi=1.0,
    )  # fmt: skip
    verify_strict: bool = _field(False, "Raise VerificationError on a parity-guard mismatch.")
    return_routed_experts: bool = _field(
        False, "Mixture-of-experts models: put each generated token's expert ids per sparse layer "
        "on its output (routed_experts).")  # fmt: skip
    check_divergence: bool = _field(
        True, "Multi-process runs: compare every step's plan across processes before running it "
        "(an all-gather of a digest); a difference raises on every process.")  # fmt: skip

    def __post_init__(self) -> None:
        _validate(self)
        for name in ("page_size", "min_token_bucket"):
            if getattr(self, name) & (getattr(self, name) - 1):
                raise ValueError(f"{name}={getattr(self, name)} must be a power of two")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= "
                             f"max_num_seqs={self.max_num_seqs} (every running sequence decodes "
                             "one token a step)")  # fmt: skip
        self._numerics()  # column_blocks against tensor_parallel_size

    def _numerics(self) -> Numerics:
        tp = self.tensor_parallel_size
        blocks = tp if self.column_blocks is None else self.column_blocks
        check_column_blocks(blocks, tp)
        return Numerics(mode=self.numerics, backend=self.kernel_backend, column_blocks=blocks,
                        lm_head_dtype=self.lm_head_dtype)  # fmt: skip

    def resolved_numerics(self) -> Numerics:
        """The engine's `Numerics` (backend resolved for this platform)."""
        return resolve_numerics(self._numerics(), self.tensor_parallel_size)
