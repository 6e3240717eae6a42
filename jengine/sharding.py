"""Tensor and data parallelism that change no bit: meshes, partition specs, the sharded forward.

Mesh: axes ('data', 'model') of shape (data_parallel_size, tensor_parallel_size), from
`jax.devices()` or given. Every partition spec lives here (`param_specs`, `KV_SPEC`).

Tensor parallelism (axis 'model'), bitwise equal to one device (BUILD.md's tensor-parallel
section): heads, KV pages (by KV head) and every projection are split by output columns, the
embedding / lm_head by vocabulary rows; activations are all-gathered, no reduction is ever split.
With num_kv_heads < tp the k/v weights are replicated and each device keeps the KV head its query
heads use. Every matmul computes its output in `Numerics.column_blocks` = C fixed blocks, so a
device holding 1/tp of the columns runs C/tp of exactly the dots one device runs.

Expert parallelism (axis 'model' too): a sparse layer's experts split into tp consecutive groups
(`EXPERT_SPEC`); each device computes every token's expert products on its own experts, the
products are all-gathered and each token's k are summed by rank on every device
(`_LocalContext.experts`): gathered, never reduced across devices. Routers are replicated.

Data parallelism (axis 'data'): one SPMD step over the whole mesh; data row i runs replica i's
plan (plans and KV pages carry a leading [dp] axis), params are replicated over 'data'.
This module imports nothing above the model layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jengine.config import EngineConfig, ModelConfig, Numerics, check_column_blocks
from jengine.models.transformer import KVCache, Params, ScratchKV, forward, param_shapes
from pallas_kernels import ops

DATA, MODEL = "data", "model"
# [dp, num_layers, num_pages, page_size, kv_heads, head_dim]: one stacked pool per data row,
# split by KV head
KV_SPEC = P(DATA, None, None, None, MODEL, None)
# an expert leaf [E, out, in] (in a layer): experts split into tp consecutive groups over 'model'
EXPERT_SPEC = P(MODEL, None, None)


# -- meshes -----------------------------------------------------------------------------------


def make_mesh(tensor_parallel_size: int = 1, data_parallel_size: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:  # fmt: skip
    """A ('data', 'model') mesh of shape (dp, tp) over the first dp * tp of `devices` (default:
    ceil(dp * tp / processes) of each process's devices, so every process owns one)."""
    need, procs = tensor_parallel_size * data_parallel_size, jax.process_count()
    if devices is None:
        by_process = [[d for d in jax.devices() if d.process_index == p] for p in range(procs)]
        devices = [d for ds in by_process for d in ds[: -(-need // procs)]]
    if len(devices) < need:
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} x data_parallel_size="
                         f"{data_parallel_size} needs {need} devices; {len(devices)} available")
    grid = np.asarray(devices[:need], dtype=object)
    return Mesh(grid.reshape(data_parallel_size, tensor_parallel_size), (DATA, MODEL))


def normalize_mesh(mesh: Mesh) -> Mesh:
    """`mesh` as a 2-D ('data', 'model') mesh (a missing axis has size 1)."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    names = tuple(mesh.axis_names)
    if not set(names) <= {DATA, MODEL}:
        raise ValueError(f"mesh axes {names} must be among ({DATA!r}, {MODEL!r})")
    if names == (DATA, MODEL):
        return mesh
    devs = mesh.devices
    if names == (MODEL, DATA):
        devs = devs.T
    elif names == (MODEL,):
        devs = devs.reshape(1, -1)
    elif names == (DATA,):
        devs = devs.reshape(-1, 1)
    return Mesh(devs, (DATA, MODEL))


def mesh_sizes(mesh: Mesh) -> tuple[int, int]:
    """(data_parallel_size, tensor_parallel_size) of a mesh."""
    shape = dict(mesh.shape)
    return shape.get(DATA, 1), shape.get(MODEL, 1)


def engine_mesh(config: EngineConfig, mesh: Mesh | None) -> Mesh:
    """The engine's mesh: `mesh` checked against the config's sizes, or built from jax.devices().
    This process owns a device of it: it reads the step's replicated outputs from one."""
    tp, dp = config.tensor_parallel_size, config.data_parallel_size
    mesh = make_mesh(tp, dp) if mesh is None else normalize_mesh(mesh)
    if mesh_sizes(mesh) != (dp, tp):
        raise ValueError(f"mesh has (data, model) sizes {mesh_sizes(mesh)} but the config asks "
                         f"for data_parallel_size={dp}, tensor_parallel_size={tp}")
    if jax.process_index() not in {d.process_index for d in mesh.devices.flat}:
        raise ValueError(f"the mesh holds no device of process {jax.process_index()}")
    return mesh


# -- numerics and model checks ----------------------------------------------------------------


def kv_heads_stored(config: ModelConfig, tp: int) -> int:
    """KV heads of the page arrays: num_kv_heads, or tp when KV heads are replicated (kv < tp)."""
    return config.num_kv_heads if config.num_kv_heads % tp == 0 else tp


def check_model(config: ModelConfig, tp: int, column_blocks: int) -> None:
    """Raises ValueError naming every shape that `tp` / `column_blocks` cannot split exactly."""
    c, kvh, heads = column_blocks, config.num_kv_heads, config.num_heads
    problems = []
    if kvh % tp and tp % kvh:
        problems.append(f"num_kv_heads={kvh} and tp={tp}: one must divide the other")
    for name, n in (("num_heads", heads), ("hidden_size", config.hidden_size),
                    ("intermediate_size", config.intermediate_size),
                    ("shared_expert_intermediate_size", config.shared_expert_intermediate_size),
                    ("vocab_size", config.vocab_size),
                    ("num_kv_heads * head_dim", kvh * config.head_dim)):  # fmt: skip
        if n % c:
            problems.append(f"{name}={n} is not a multiple of column_blocks={c}")
    if not problems and c > 1:
        unit, group = ops.head_unit(heads, kvh, c), heads // kvh
        if group % unit:
            problems.append(f"attention head unit {unit} does not divide the {group} heads per "
                            "KV head")  # fmt: skip
    if config.num_experts % tp:
        problems.append(f"num_experts={config.num_experts} is not a multiple of tp={tp} (experts "
                        "are split over the devices)")  # fmt: skip
    if problems:
        raise ValueError("cannot shard this model bitwise: " + "; ".join(problems))


# -- partition specs --------------------------------------------------------------------------


def param_specs(config: ModelConfig, tp: int) -> Params:
    """PartitionSpec per param (the `param_shapes` tree): output rows (columns of the product) and
    the vocabulary split; every matrix is `[out, in]`, a layer leaf has the leading [num_layers]
    axis (never split)."""
    split = config.num_kv_heads % tp == 0  # else the k/v weights are replicated
    kv, kv_bias = (P(MODEL, None), P(MODEL)) if split else (P(), P())
    by_name = dict.fromkeys(("attn_norm", "mlp_norm", "post_attn_norm", "post_mlp_norm", "q_norm",
                             "k_norm"), P())  # fmt: skip
    by_name.update(dict.fromkeys(("wq", "wo", "w_gate", "w_up", "w_down", "shared_w_gate",
                                  "shared_w_up", "shared_w_down"), P(MODEL, None)))  # fmt: skip
    # the router and the shared expert's gate replicated; experts split by expert (EXPERT_SPEC)
    by_name.update(router=P(), shared_expert_gate=P(),
                   **dict.fromkeys(("experts_gate", "experts_up", "experts_down"), EXPERT_SPEC))
    by_name.update(bq=P(MODEL), wk=kv, wv=kv, bk=kv_bias, bv=kv_bias)
    shapes = param_shapes(config)
    specs: Params = {
        "embed": P(MODEL, None),
        "final_norm": P(),
        "layers": {k: P(None, *by_name[k]) for k in shapes["layers"]},
    }
    if "lm_head" in shapes:
        specs["lm_head"] = P(MODEL, None)
    return specs


def param_shardings(config: ModelConfig, mesh: Mesh) -> Params:
    """NamedSharding per param on `mesh` (pass to loaders as `shardings`)."""
    mesh = normalize_mesh(mesh)
    _, tp = mesh_sizes(mesh)
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), param_specs(config, tp),
                                  is_leaf=lambda x: isinstance(x, P))  # fmt: skip


def shard_params(params: Params, config: ModelConfig, mesh: Mesh) -> Params:
    """`params` placed in the sharded layout (a no-op for leaves already there)."""
    return jax.device_put(params, param_shardings(config, mesh))


def empty_kv_cache(config: ModelConfig, num_pages: int, page_size: int, dtype: Any,
                   mesh: Mesh) -> KVCache:  # fmt: skip
    """Zeroed stacked (k_pages, v_pages), each [dp, num_layers, num_pages, page_size, kv_stored,
    head_dim]: one pool per data row, split by KV head over 'model', made on the devices."""
    mesh = normalize_mesh(mesh)
    dp, tp = mesh_sizes(mesh)
    shape = (dp, config.num_layers, num_pages, page_size, kv_heads_stored(config, tp),
             config.head_dim)  # fmt: skip
    sharding = NamedSharding(mesh, KV_SPEC)
    zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
    return zeros(), zeros()


# -- the sharded step -------------------------------------------------------------------------


class _LocalContext:
    """What `models.transformer.forward` needs inside shard_map (see its `tp` argument)."""

    def __init__(self, config: ModelConfig, tp: int, numerics: Numerics):
        self.config, self.tp = config, tp
        self.kv_replicated = config.num_kv_heads % tp != 0
        # replicated k/v weights hold all columns: computed in all C blocks, as on one device
        self.kv_numerics = numerics.replace(column_blocks=numerics.column_blocks * tp) if (
            self.kv_replicated) else numerics  # fmt: skip

    def gather(self, x: jax.Array) -> jax.Array:
        """All devices' column shards of x, concatenated in device order (exact)."""
        return jax.lax.all_gather(x, MODEL, axis=x.ndim - 1, tiled=True)

    def embed(self, table: jax.Array, tokens: jax.Array) -> jax.Array:
        """Rows of a vocabulary-sharded table: each device looks up what it owns, the owner's
        row is selected after an all-gather (no sum, so no -0.0 + 0.0 rounding)."""
        rows_per = table.shape[0]
        start = jax.lax.axis_index(MODEL) * rows_per
        local = jnp.clip(tokens - start, 0, rows_per - 1)
        mine = table[local]  # [T, H]; rows this device does not own are discarded below
        every = jax.lax.all_gather(mine, MODEL, axis=0)  # [tp, T, H]
        owner = tokens // rows_per
        return every[owner, jnp.arange(tokens.shape[0])]

    def experts(self, x: jax.Array, ids: jax.Array, weights: jax.Array, w_gate: jax.Array,
                w_up: jax.Array, w_down: jax.Array, numerics: Numerics) -> jax.Array:
        """Expert parallelism: this device holds experts [d * E/tp, (d + 1) * E/tp) (w_* are its
        [E/tp, ...] slices) and computes every token's products on them (the others' rows with
        gate weight 0, discarded); the devices' f32[T, k, H] products are all-gathered and each
        (token, rank) takes its owner's, then they are summed by rank: the one-device bits (an
        expert row's bits do not depend on the rows beside it), with no cross-device sum."""
        local = w_gate.shape[0]
        first = jax.lax.axis_index(MODEL) * local
        owned = (ids >= first) & (ids < first + local)
        products = ops.expert_products(x, jnp.where(owned, ids - first, 0),
                                       jnp.where(owned, weights, 0.0), w_gate, w_up, w_down,
                                       numerics)  # fmt: skip
        every = jax.lax.all_gather(products, MODEL)  # [tp, T, k, H]
        owner = (ids // local)[None, :, :, None]
        return ops.sum_by_rank(jnp.take_along_axis(every, owner, axis=0)[0], x.dtype)

    def local_kv(self, x: jax.Array) -> jax.Array:
        """x[T, heads computed, D] -> the KV heads this device stores."""
        if not self.kv_replicated:
            return x
        idx = jax.lax.axis_index(MODEL) * self.config.num_kv_heads // self.tp
        return jax.lax.dynamic_slice_in_dim(x, idx, 1, axis=1)


def local_numerics(numerics: Numerics, tp: int) -> Numerics:
    check_column_blocks(numerics.column_blocks, tp)
    return numerics.replace(column_blocks=numerics.column_blocks // tp)


def sharded_forward(mesh: Mesh, params: Params, config: ModelConfig, plan: Any,
                    kv: KVCache | ScratchKV, numerics: Numerics,
                    post: Callable[[jax.Array, Any, jax.Array], Any] | None = None,
                    remat: bool = False,
                    ) -> tuple[Any, KVCache | ScratchKV]:  # fmt: skip
    """`forward` under shard_map over the whole ('data', 'model') mesh (called inside a jit).

    `plan` is a pytree of arrays with a leading [dp] axis (data row i's plan), `kv` is laid out as
    `empty_kv_cache` makes it (or `ScratchKV`: each device's own empty pages), `params` as
    `param_specs` says (replicated over 'data'). `post(logits, plan, routing)` (e.g. sampling)
    runs on the gathered logits (and `forward`'s routing, the same on every model device) on
    every model device. Returns (post(...) or the logits with a leading [dp]
    axis, replicated on every device, so every process can read all of it; the new kv).
    """
    mesh = normalize_mesh(mesh)
    _, tp = mesh_sizes(mesh)
    inner = local_numerics(numerics, tp)
    tree_map = jax.tree_util.tree_map
    scratch = kv if isinstance(kv, ScratchKV) else None
    kv_specs = () if scratch else (KV_SPEC, KV_SPEC)

    def body(params, kv, plan):
        plan, kv = tree_map(lambda x: x[0], (plan, kv))  # this data row's
        ctx = _LocalContext(config, tp, inner) if tp > 1 else None
        logits, kv, routing = forward(params, config, plan, scratch or kv, inner, tp=ctx,
                                      remat=remat, return_routing=True)  # fmt: skip
        out = logits if post is None else post(logits, plan, routing)
        every = tree_map(lambda x: jax.lax.all_gather(x, DATA), out)  # [dp, ...]
        return every, () if scratch else tree_map(lambda x: x[None], kv)

    fn = jax.shard_map(body, mesh=mesh, in_specs=(param_specs(config, tp), kv_specs, P(DATA)),
                       out_specs=(P(), kv_specs), check_vma=False)  # fmt: skip
    out, new_kv = fn(params, () if scratch else kv, plan)
    return out, scratch or new_kv
