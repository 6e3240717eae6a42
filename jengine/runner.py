"""The device layer: params and KV pages on one device or a mesh, the bucket table, the jitted step.

`model_step` is the one compiled function behind the engine and `jengine.score`: forward over a
padded `StepPlan`, then `sampling.select` over its logit rows. On a mesh (tensor or data
parallel) the same body runs under `sharding.sharded_forward`, the one place the step is
sharded; the data replicas' plans are stacked on a leading axis. Shapes are bucketed (token count
to a power of two, sequence rows with it), so the number of compilations is bounded by the bucket
table; the KV pages are donated and updated in place.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence

import jax
import numpy as np

from jengine import plan as plan_lib
from jengine import sampling, sharding
from jengine.config import ModelConfig, Numerics
from jengine.models.transformer import KVCache, Model, Params, empty_kv_cache, forward
from jengine.plan import StepPlan

MIN_TOKEN_BUCKET = 16  # EngineConfig.min_token_bucket's default
MAX_TOP_N = 20  # a step returns 0 or MAX_TOP_N alternatives per token: two entries per bucket


@functools.partial(
    jax.jit,
    static_argnames=("config", "numerics", "logprobs_mode", "top_n", "mesh"),
    donate_argnames=("kv",),
)
def model_step(
    params: Params,
    kv: KVCache,
    plan: StepPlan,
    *,
    config: ModelConfig,
    numerics: Numerics,
    logprobs_mode: str,
    top_n: int,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[sampling.Selected, KVCache]:
    """One step: write the plan's K/V, compute the logits of its logit rows, select tokens.

    Without `mesh`: params, kv and plan on one device. With a ('data', 'model') mesh: params and
    kv laid out by `jengine.sharding`, every plan leaf (and the result) with a leading [dp] axis.
    """

    def select(logits: jax.Array, p: StepPlan) -> sampling.Selected:
        return sampling.select(logits, p.rows, logprobs_mode, top_n)

    if mesh is None:
        logits, kv = forward(params, config, plan, kv, numerics)
        return select(logits, plan), kv
    return sharding.sharded_forward(mesh, params, config, plan, kv, numerics, select)


def next_pow2(n: int, lo: int = 1) -> int:
    return max(lo, 1 << max(0, (n - 1).bit_length()))


def place(model: Model, mesh: jax.sharding.Mesh | None) -> Params:
    """The params committed to their device(s): the sharded layout on a mesh, else committed to
    the default device (a committed argument is a different jit cache key than an uncommitted
    one: without this, every bucket would recompile after the first weight update)."""
    if mesh is not None:
        return sharding.shard_params(model.params, model.config, mesh)
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, x.sharding), model.params)


def empty_pages(
    config: ModelConfig, num_pages: int, page_size: int, dtype, mesh: jax.sharding.Mesh | None
) -> KVCache:
    """Zeroed KV pages: one pool on one device, or one per data row of `mesh`."""
    if mesh is not None:
        return sharding.empty_kv_cache(config, num_pages, page_size, dtype, mesh)
    kv = empty_kv_cache(config, num_pages, page_size, dtype)
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, x.sharding), kv)  # committed


def run_plans(
    params: Params,
    kv: KVCache,
    plans: Sequence[StepPlan],
    shape: tuple[int, int, int],
    no_slot: int,
    *,
    config: ModelConfig,
    numerics: Numerics,
    logprobs_mode: str,
    top_n: int,
    mesh: jax.sharding.Mesh | None,
) -> tuple[list[sampling.Selected], KVCache]:
    """Pads each plan to `shape` = (tokens, page-table rows, logit rows), runs them as one step
    (one plan per data row of `mesh`, or one plan without a mesh) and returns each plan's numpy
    `Selected`, trimmed to its own logit rows, and the new KV pages."""
    padded = [p.padded(*shape, no_slot) for p in plans]
    if mesh is None:
        (batch,) = padded
    else:
        batch = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *padded)
    sel, kv = model_step(
        params, kv, batch, config=config, numerics=numerics, logprobs_mode=logprobs_mode,
        top_n=top_n, mesh=mesh,
    )  # fmt: skip
    sel = jax.tree_util.tree_map(np.asarray, sel)
    if mesh is None:
        sel = jax.tree_util.tree_map(lambda a: a[None], sel)
    return [
        jax.tree_util.tree_map(lambda a, i=i, r=len(p.logit_rows): a[i, :r], sel)
        for i, p in enumerate(plans)
    ], kv


class Runner:
    """Owns the engine's params and KV pages and runs its steps at bucketed shapes.

    Token buckets: powers of two from `min_tokens` up to `max_tokens`; the sequence/logit-row
    bucket is min(token bucket, next_pow2(max_seqs)). `top_n` is 0 or MAX_TOP_N, so the table
    has 2 x len(token_buckets) entries. With a mesh, every data row runs its replica's plan in
    the same step (padded to the largest replica's bucket).
    """

    def __init__(
        self,
        model: Model,
        numerics: Numerics,
        *,
        logprobs_mode: str,
        num_pages: int,
        page_size: int,
        max_tokens: int,
        max_seqs: int,
        min_tokens: int = MIN_TOKEN_BUCKET,
        mesh: jax.sharding.Mesh | None = None,
    ):
        self.config = model.config
        self.numerics = numerics
        self.logprobs_mode = logprobs_mode
        self.mesh = mesh
        self.num_replicas = 1 if mesh is None else sharding.mesh_sizes(mesh)[0]
        self.params = place(model, mesh)
        self.kv = empty_pages(model.config, num_pages, page_size, model.params["embed"].dtype, mesh)
        self.no_slot = num_pages * page_size
        self.token_buckets = [min_tokens]
        while self.token_buckets[-1] < max_tokens:
            self.token_buckets.append(2 * self.token_buckets[-1])
        self.max_seq_bucket = next_pow2(max_seqs)
        self.compiled: set[tuple[int, int, int]] = set()
        self.compile_seconds = 0.0

    @property
    def bucket_table_size(self) -> int:
        return 2 * len(self.token_buckets)

    def bucket(self, num_tokens: int) -> tuple[int, int]:
        """(token bucket, sequence/logit-row bucket) of a step with `num_tokens` tokens."""
        for t in self.token_buckets:
            if t >= num_tokens:
                return t, min(t, self.max_seq_bucket)
        raise ValueError(f"{num_tokens=} exceeds the largest token bucket {self.token_buckets[-1]}")

    def set_params(self, params: Params) -> None:
        """Places validated `params` like the current ones (same devices and layout); they may be
        host arrays or global arrays laid out on another mesh over the same devices (a trainer's
        layout), which are resharded."""
        def put(new: jax.Array, old: jax.Array) -> jax.Array:
            # one leaf at a time: on a multi-process mesh, reshards in flight together may start
            # their collectives in different orders on different processes and deadlock
            return jax.device_put(new, old.sharding).block_until_ready()

        self.params = jax.tree_util.tree_map(put, params, self.params)

    def run(
        self, plans: Sequence[StepPlan], top_n: int = 0, min_tokens: int = 0
    ) -> tuple[list[sampling.Selected], bool, float]:
        """Runs one step of every replica's plan (one per replica, in replica order).

        Returns (numpy Selected per plan, compiled_now, seconds). `min_tokens` forces a bucket at
        least that large (warm-up).
        """
        if len(plans) != self.num_replicas:
            raise ValueError(f"{len(plans)} plans for {self.num_replicas} replicas")
        top_n = MAX_TOP_N if top_n else 0
        num_tokens, num_seqs = self.bucket(max(min_tokens, *(p.num_tokens for p in plans)))
        key = (num_tokens, num_seqs, top_n)
        start = time.perf_counter()
        sels, self.kv = run_plans(
            self.params, self.kv, plans, (num_tokens, num_seqs, num_seqs), self.no_slot,
            config=self.config, numerics=self.numerics, logprobs_mode=self.logprobs_mode,
            top_n=top_n, mesh=self.mesh,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        compiled_now = key not in self.compiled
        if compiled_now:
            self.compiled.add(key)
            self.compile_seconds += seconds
        return sels, compiled_now, seconds

    def warmup(self, pages_per_seq: int, with_top_n: bool = False) -> int:
        """Compiles every bucket with all-padding plans (they write nothing). Returns how many."""
        empty = plan_lib.build([], page_size=1, pages_per_seq=pages_per_seq)
        before = len(self.compiled)
        for t in self.token_buckets:
            for top_n in (0, 1) if with_top_n else (0,):
                self.run([empty] * self.num_replicas, top_n=top_n, min_tokens=t)
        return len(self.compiled) - before

