"""The device layer: params and KV pages on one device or a mesh, the bucket table, the jitted step.

`model_step` is the one compiled function behind the engine and `jengine.score`: forward over a
padded `StepPlan`, then `sampling.select` over its logit rows. On a mesh (tensor or data
parallel) the same body runs under `sharding.sharded_forward`, the one place the step is
sharded; the data replicas' plans are stacked on a leading axis. Shapes are bucketed (token count
to a power of two, sequence rows with it), so the number of compilations is bounded by the bucket
table; the KV pages are donated and updated in place.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from jengine import plan as plan_lib
from jengine import sampling, sharding
from jengine.config import ModelConfig, Numerics
from jengine.models.transformer import KVCache, Model, Params, empty_kv_cache, forward
from jengine.plan import StepPlan

MIN_TOKEN_BUCKET = 16  # EngineConfig.min_token_bucket's default
MAX_TOP_N = 20  # a step returns 0 or MAX_TOP_N alternatives per token: two entries per bucket


@functools.partial(
    jax.jit,
    static_argnames=("config", "numerics", "logprobs_mode", "top_n", "mesh", "routing"),
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
    routing: bool = False,
) -> tuple[sampling.Selected, KVCache]:
    """One step: write the plan's K/V, compute the logits of its logit rows, select tokens.

    Without `mesh`: params, kv and plan on one device. With a ('data', 'model') mesh: params and
    kv laid out by `jengine.sharding`, every plan leaf (and the result) with a leading [dp] axis.
    `routing`: `Selected.routing` holds each logit row's expert ids per sparse layer.
    """

    def select(logits: jax.Array, p: StepPlan, routed: jax.Array | None) -> sampling.Selected:
        sel = sampling.select(logits, p.rows, logprobs_mode, top_n)
        return sel if routed is None else dataclasses.replace(sel, routing=routed[p.logit_rows])

    if mesh is None:
        logits, kv, routed = forward(params, config, plan, kv, numerics, return_routing=True)
        return select(logits, plan, routed if routing else None), kv
    post = select if routing else (lambda logits, p, routed: select(logits, p, None))
    return sharding.sharded_forward(mesh, params, config, plan, kv, numerics, post)


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


def stack_plans(plans: Sequence[StepPlan], shape: tuple[int, int, int], no_slot: int,
                mesh: jax.sharding.Mesh | None) -> StepPlan:  # fmt: skip
    """Each plan padded to `shape` = (tokens, page-table rows, logit rows); one plan without a
    mesh, else stacked on a leading [dp] axis (one per data row)."""
    padded = [p.padded(*shape, no_slot) for p in plans]
    if mesh is None:
        (batch,) = padded
        return batch
    return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *padded)


def split_selected(sel: sampling.Selected, plans: Sequence[StepPlan],
                   mesh: jax.sharding.Mesh | None) -> list[sampling.Selected]:  # fmt: skip
    """A step's device `Selected` -> each plan's numpy `Selected`, trimmed to its logit rows."""
    sel = jax.tree_util.tree_map(np.asarray, sel)
    if mesh is None:
        sel = jax.tree_util.tree_map(lambda a: a[None], sel)
    return [
        jax.tree_util.tree_map(lambda a, i=i, r=len(p.logit_rows): a[i, :r], sel)
        for i, p in enumerate(plans)
    ]


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
    batch = stack_plans(plans, shape, no_slot, mesh)
    sel, kv = model_step(
        params, kv, batch, config=config, numerics=numerics, logprobs_mode=logprobs_mode,
        top_n=top_n, mesh=mesh,
    )  # fmt: skip
    return split_selected(sel, plans, mesh), kv


# Every step compiled in this process, shared by all runners (engines): (bucket, static arguments,
# argument layouts) -> the compiled step.
_STEPS: dict[tuple, jax.stages.Compiled] = {}


def clear_compiled_steps() -> None:
    """Forgets the steps compiled in this process (engines keep theirs); with `jax.clear_caches()`
    every compiled program is dropped (XLA:CPU maps memory per program)."""
    _STEPS.clear()


def _layout(tree) -> tuple:
    """A pytree's structure and its leaves' shapes, dtypes and shardings (hashable)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((x.shape, x.dtype.name, getattr(x, "sharding", None)) for x in leaves)


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
        routing: bool = False,
    ):
        self.config = model.config
        self.routing = routing
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
        # (token bucket, seq bucket, top_n) -> the step compiled ahead of time for it
        self.compiled: dict[tuple[int, int, int], jax.stages.Compiled] = {}
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
        host arrays, global arrays laid out on another mesh over the same devices (a trainer's
        layout), which are resharded, or, for a host-local engine, global arrays spanning other
        processes, which every process gathers (a collective: all call it together)."""
        def gathered(new: jax.Array, old: jax.Array) -> jax.Array:
            if (isinstance(new, jax.Array) and not new.is_fully_addressable
                    and old.is_fully_addressable):  # fmt: skip
                return multihost_utils.process_allgather(new, tiled=True)
            return new

        params = jax.tree_util.tree_map(gathered, params, self.params)
        shardings = jax.tree_util.tree_map(lambda old: old.sharding, self.params)
        if jax.process_count() == 1:  # every transfer at once, then wait
            self.params = jax.block_until_ready(jax.device_put(params, shardings))
            return
        # one leaf at a time: on a multi-process mesh, reshards in flight together may start
        # their collectives in different orders on different processes and deadlock
        self.params = jax.tree_util.tree_map(
            lambda new, s: jax.device_put(new, s).block_until_ready(), params, shardings)

    def _compile(self, key: tuple[int, int, int],
                 pages_per_seq: int) -> tuple[jax.stages.Compiled, float]:  # fmt: skip
        """The step of bucket `key` = (tokens, seqs, top_n) compiled ahead of time (traced with an
        all-padding plan of that shape), and the seconds it took (0.0: another runner of this
        process compiled it). Changes nothing here: threads may compile several buckets at once."""
        num_tokens, num_seqs, top_n = key
        empty = plan_lib.build([], page_size=1, pages_per_seq=pages_per_seq)
        batch = stack_plans([empty] * self.num_replicas, (num_tokens, num_seqs, num_seqs),
                            self.no_slot, self.mesh)  # fmt: skip
        signature = (key, self.config, self.numerics, self.logprobs_mode, self.mesh, self.routing,
                     *(_layout(x) for x in (self.params, self.kv, batch)))  # fmt: skip
        if (exe := _STEPS.get(signature)) is not None:
            return exe, 0.0
        start = time.perf_counter()
        exe = _STEPS[signature] = model_step.lower(
            self.params, self.kv, batch, config=self.config, numerics=self.numerics,
            logprobs_mode=self.logprobs_mode, top_n=top_n, mesh=self.mesh, routing=self.routing,
        ).compile()  # fmt: skip
        return exe, time.perf_counter() - start

    def _add(self, key: tuple[int, int, int], exe: jax.stages.Compiled, seconds: float) -> None:
        self.compiled[key] = exe
        self.compile_seconds += seconds

    def run(
        self, plans: Sequence[StepPlan], top_n: int = 0
    ) -> tuple[list[sampling.Selected], bool, float]:
        """Runs one step of every replica's plan (one per replica, in replica order).

        Returns (numpy Selected per plan, compiled_now, seconds: compiling included).
        """
        if len(plans) != self.num_replicas:
            raise ValueError(f"{len(plans)} plans for {self.num_replicas} replicas")
        top_n = MAX_TOP_N if top_n else 0
        num_tokens, num_seqs = self.bucket(max(p.num_tokens for p in plans))
        key = (num_tokens, num_seqs, top_n)
        start = time.perf_counter()
        compiled_now = key not in self.compiled
        if compiled_now:
            self._add(key, *self._compile(key, plans[0].page_table.shape[1]))
        batch = stack_plans(plans, (num_tokens, num_seqs, num_seqs), self.no_slot, self.mesh)
        sel, self.kv = self.compiled[key](self.params, self.kv, batch)
        sels = split_selected(sel, plans, self.mesh)
        return sels, compiled_now, time.perf_counter() - start

    def warmup(self, pages_per_seq: int, with_top_n: bool = False, threads: int | None = None,
               progress: bool | None = None) -> dict[tuple[int, int, int], float]:  # fmt: skip
        """Compiles every bucket not compiled yet, `threads` at a time (default: one per CPU core,
        at most 4); a tqdm bar on stderr (`progress`; default: when a terminal). Returns
        {(tokens, seqs, top_n): compile seconds} of the buckets compiled now (0.0: another engine
        of this process had compiled it)."""
        from tqdm.auto import tqdm

        keys = [(t, min(t, self.max_seq_bucket), top_n) for t in self.token_buckets
                for top_n in ((0, MAX_TOP_N) if with_top_n else (0,))]  # fmt: skip
        keys = [k for k in keys if k not in self.compiled]
        threads = threads or min(4, os.cpu_count() or 1)
        show = progress or (progress is None and sys.stderr.isatty())
        seconds = {}
        with tqdm(total=len(keys), desc="compile", unit="bucket", disable=not show) as bar, \
                concurrent.futures.ThreadPoolExecutor(threads) as pool:  # fmt: skip
            jobs = {pool.submit(self._compile, k, pages_per_seq): k for k in keys}
            for job in concurrent.futures.as_completed(jobs):
                key, (exe, seconds[key]) = jobs[job], job.result()
                self._add(key, exe, seconds[key])
                bar.set_postfix_str(f"{key[0]} tokens: {seconds[key]:.1f}s")
                bar.update()
        return {k: seconds[k] for k in keys}
