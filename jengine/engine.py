"""The public engine: requests in, tokens with their exact logprobs and policy versions out.

    engine = Engine(model, EngineConfig())
    outs = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=8, seed=0))
    engine.update_weights(new_params)            # between steps; returns the new version

Guarantees (each tested): every returned logprob is bitwise `jengine.score` of the same tokens
with the same params and settings; a request's tokens and logprobs do not depend on its batch,
the step budget, page size or placement, arrival order (given its seed), prefix caching or
preemption.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jengine.config import EngineConfig, SamplingParams
from jengine.kv_cache import BlockAllocator
from jengine.models.transformer import Model, Params, empty_kv_cache, param_shapes
from jengine.runner import Runner
from jengine.scheduler import Scheduled, Scheduler
from jengine.scheduler import Sequence as Seq
from pallas_kernels.ops import Numerics, default_backend

FINISH_REASONS = ("stop", "length", "aborted", "error")
UPDATE_MODES = ("keep", "recompute", "abort")


@dataclasses.dataclass
class RequestOutput:
    """A finished request.

    token_ids, logprobs (f32) and policy_versions (i32) are aligned: entry i is the i-th generated
    token, its number under the engine's `logprobs_mode`, and the policy version that produced it.
    top_logprobs: when `SamplingParams.logprobs = n > 0`, per token a list of n (token id, value)
    pairs, best first; else None.
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: np.ndarray
    policy_versions: np.ndarray
    finish_reason: str
    top_logprobs: list[list[tuple[int, float]]] | None = None
    error: str | None = None


def _bytes_per_page(model: Model, page_size: int) -> int:
    c = model.config
    itemsize = jnp.dtype(model.params["embed"].dtype).itemsize
    return 2 * c.num_layers * page_size * c.num_kv_heads * c.head_dim * itemsize


def _check_model_params(model: Model) -> None:
    """Refuses a Model whose params do not fit its config (tree, shapes) or are non-finite,
    before any engine state exists: otherwise the first step() would crash or every request
    would error."""
    want, want_def = jax.tree_util.tree_flatten(
        param_shapes(model.config), is_leaf=lambda x: isinstance(x, tuple)
    )
    got_paths, got_def = jax.tree_util.tree_flatten_with_path(model.params)
    if got_def != want_def:
        raise ValueError(
            f"model.params do not match model.config ({model.config.name!r}): tree structure "
            f"{got_def} vs {want_def}"
        )
    for (path, leaf), shape in zip(got_paths, want):
        name = jax.tree_util.keystr(path)
        if tuple(getattr(leaf, "shape", ())) != tuple(shape):
            raise ValueError(
                f"model.params{name} has shape {getattr(leaf, 'shape', None)}, model.config "
                f"says {shape}"
            )
        if not bool(jnp.all(jnp.isfinite(leaf))):
            raise ValueError(f"model.params{name} holds non-finite values")


def _kv_budget_bytes() -> int:
    """Half the first device's free memory when the platform reports it, else 2 GiB."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
        limit = stats.get("bytes_limit")
        if limit:
            return int(0.5 * (limit - stats.get("bytes_in_use", 0)))
    except Exception:  # platforms without memory_stats (CPU) fall through
        pass
    return 2 << 30


class Engine:
    """A rollout engine over one model. Not thread-safe: call it from one thread.

    `mesh`: an optional ('data', 'model') `jax.sharding.Mesh` of shape (data_parallel_size,
    tensor_parallel_size); by default one is built from `jax.devices()` when tp * dp > 1. With
    data_parallel_size > 1 the constructor returns a `jengine.sharding` DataParallelEngine (an
    Engine: dp replicas behaving as one). See `jengine.sharding` for the bitwise design.
    """

    def __new__(cls, model: Model = None, config: EngineConfig | None = None, **kwargs: Any):
        if cls is Engine and isinstance(config, EngineConfig) and config.data_parallel_size > 1:
            from jengine.sharding import data_parallel_engine_class

            return super().__new__(data_parallel_engine_class())
        return super().__new__(cls)

    def __init__(self, model: Model, config: EngineConfig | None = None, *, mesh: Any = None):
        if not isinstance(model, Model):
            raise TypeError(f"model must be a jengine Model, got {type(model).__name__}")
        config = config or EngineConfig()
        if not isinstance(config, EngineConfig):
            raise TypeError(f"config must be an EngineConfig, got {type(config).__name__}")
        _check_model_params(model)
        mc = model.config
        max_model_len = config.max_model_len or mc.max_position_embeddings
        if max_model_len > mc.max_position_embeddings:
            raise ValueError(
                f"max_model_len={max_model_len} exceeds the model's "
                f"max_position_embeddings={mc.max_position_embeddings}"
            )
        if config.data_parallel_size > 1:
            raise ValueError("data_parallel_size > 1: construct it as Engine(model, config)")
        column_blocks = config.column_blocks or config.tensor_parallel_size
        self.mesh = None
        parallel = None
        if config.tensor_parallel_size > 1 or mesh is not None:
            from jengine import sharding

            self.mesh = sharding.engine_mesh(config, mesh)
            sharding.check_model(mc, config.tensor_parallel_size, column_blocks)
            model = Model(mc, sharding.shard_params(model.params, mc, self.mesh))
            if config.tensor_parallel_size > 1:
                parallel = sharding.TensorParallel(self.mesh, column_blocks)
        elif column_blocks > 1:
            from jengine import sharding

            sharding.check_model(mc, 1, column_blocks)
        if self.mesh is None:
            # Commit the params to their device now: `update_weights` places new params with
            # `device_put(new, old.sharding)`, which commits them, and a committed argument is a
            # different jit cache key than an uncommitted one -- every bucket would silently
            # recompile after the first update.
            model = Model(mc, jax.tree_util.tree_map(lambda x: jax.device_put(x, x.sharding) if hasattr(x, "sharding") else x, model.params))
        self.model = model
        self.config = config
        self.max_model_len = max_model_len
        self.pages_per_seq = -(-max_model_len // config.page_size)
        num_pages = config.num_pages
        if num_pages is None:
            want = config.max_num_seqs * self.pages_per_seq
            num_pages = max(1, min(want, _kv_budget_bytes() // _bytes_per_page(model, config.page_size)))
        self.num_pages = num_pages
        self.numerics = Numerics(
            mode=config.numerics,
            backend=default_backend(config.kernel_backend),
            column_blocks=column_blocks,
        )
        self.allocator = BlockAllocator(num_pages, config.page_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.allocator,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            pages_per_seq=self.pages_per_seq,
        )
        if self.mesh is not None:
            kv = sharding.empty_kv_cache(
                mc, num_pages, config.page_size, model.params["embed"].dtype, self.mesh
            )
        else:
            kv = empty_kv_cache(mc, num_pages, config.page_size, model.params["embed"].dtype)
            # committed like the KV every step returns: else the second step recompiles its bucket
            kv = jax.tree_util.tree_map(lambda x: jax.device_put(x, x.sharding), kv)
        self.runner = Runner(
            mc,
            model.params,
            kv,
            numerics=self.numerics,
            lm_head_dtype=config.lm_head_dtype,
            logprobs_mode=config.logprobs_mode,
            max_tokens=config.max_num_batched_tokens,
            max_seqs=config.max_num_seqs,
            parallel=parallel,
        )
        self.policy_version = 0
        self.paused = False
        self._arrivals = itertools.count()
        self._seqs: dict[str, Seq] = {}
        self._finished_ids: set[str] = set()
        self._undelivered: list[RequestOutput] = []  # finished outside step(), returned by it
        self._step_index = 0
        self._generated = 0
        self._trace = open(config.trace_path, "a") if config.trace_path else None

    # -- requests ---------------------------------------------------------------------------

    def _validate_prompt(self, prompt: Any) -> list[int]:
        if isinstance(prompt, np.ndarray):
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)):
            raise TypeError(f"prompt_token_ids must be a list of ints, got {type(prompt).__name__}")
        if not prompt:
            raise ValueError("prompt_token_ids is empty")
        vocab = self.model.config.vocab_size
        for t in prompt:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                raise TypeError(f"prompt_token_ids holds {t!r} ({type(t).__name__}), not an int")
            if not 0 <= t < vocab:
                raise ValueError(f"prompt_token_ids holds token id {t}, outside [0, {vocab})")
        if len(prompt) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(prompt)} tokens; max_model_len={self.max_model_len} leaves no "
                "room for a completion"
            )
        return [int(t) for t in prompt]

    def _validate_request(
        self, prompt_token_ids: Any, sampling_params: Any
    ) -> tuple[list[int], SamplingParams, int]:
        """Checks one request without changing any state; returns (prompt, params, max_len)."""
        prompt = self._validate_prompt(prompt_token_ids)
        params = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        vocab = self.model.config.vocab_size
        bad = [t for t in params.stop_token_ids if t >= vocab]
        if bad:
            raise ValueError(f"stop_token_ids holds {bad}, outside [0, {vocab})")
        max_len = min(len(prompt) + params.max_tokens, self.max_model_len)
        pages_needed = -(-max_len // self.config.page_size)
        if pages_needed > self.num_pages:
            raise ValueError(
                f"request needs up to {pages_needed} KV pages ({max_len} tokens) but the pool has "
                f"{self.num_pages}: it could never run; raise num_pages or lower max_tokens"
            )
        return prompt, params, max_len

    def add_request(
        self,
        prompt_token_ids: Sequence[int],
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        stop: Callable[[list[int]], bool] | None = None,
    ) -> str:
        """Queues a request; returns its id. Validates everything before anything is queued.

        `stop`, if given, is called with the generated token ids after every new token; True
        finishes the request with finish_reason='stop'. An exception it raises finishes only this
        request, with finish_reason='error'.
        """
        prompt, params, max_len = self._validate_request(prompt_token_ids, sampling_params)
        if stop is not None and not callable(stop):
            raise TypeError(f"stop={stop!r} must be callable")
        if request_id is None:
            arrival = next(self._arrivals)
            request_id, k = f"req-{arrival}", 0
            while request_id in self._seqs or request_id in self._finished_ids:
                k += 1  # a caller already used this id: never overwrite a live request
                request_id = f"req-{arrival}-{k}"
        else:
            if not isinstance(request_id, str) or not request_id:
                raise TypeError(f"request_id={request_id!r} must be a non-empty str")
            if request_id in self._seqs or request_id in self._finished_ids:
                raise ValueError(f"request_id={request_id!r} is already in use")
            arrival = next(self._arrivals)
        seed = params.seed if params.seed is not None else (self.config.seed * 1_000_003 + arrival) % (2**31)
        seq = Seq(request_id, arrival, prompt, params, seed, max_len, stop)
        self._seqs[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Ends a request now with finish_reason='aborted' and its partial output.

        Returns that output; None if the request already finished (a no-op). Raises KeyError for
        an id the engine never saw.
        """
        if not isinstance(request_id, str):
            raise TypeError(f"abort: request_id={request_id!r} must be a str")
        seq = self._seqs.get(request_id)
        if seq is None:
            if request_id in self._finished_ids:
                return None
            raise KeyError(f"abort: unknown request_id={request_id!r}")
        return self._finish(seq, "aborted")

    def has_unfinished_requests(self) -> bool:
        return bool(self._seqs) or bool(self._undelivered)

    # -- stepping ---------------------------------------------------------------------------

    def _finish(self, seq: Seq, reason: str, error: str | None = None) -> RequestOutput:
        self.scheduler.release(seq)
        del self._seqs[seq.request_id]
        self._finished_ids.add(seq.request_id)
        seq.finish_reason = reason
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=list(seq.prompt),
            token_ids=seq.tokens[len(seq.prompt) :],
            logprobs=np.asarray(seq.logprobs, np.float32),
            policy_versions=np.asarray(seq.versions, np.int32),
            finish_reason=reason,
            top_logprobs=[list(zip(i.tolist(), v.tolist())) for i, v in seq.top]
            if seq.params.logprobs
            else None,
            error=error,
        )

    def _stop_reason(self, seq: Seq, token: int) -> str | None:
        p = seq.params
        if not p.ignore_eos and token in self.model.config.eos_token_ids:
            return "stop"
        if token in p.stop_token_ids:
            return "stop"
        if seq.num_generated >= p.max_tokens or len(seq.tokens) >= seq.max_len:
            return "length"
        return None

    def step(self) -> list[RequestOutput]:
        """Runs one engine step; returns the requests that finished in it (none while paused)."""
        if self.paused:
            return []
        finished, self._undelivered = self._undelivered, []
        scheduled = self.scheduler.schedule()
        if scheduled is None:
            return finished
        top_n = max((s.params.logprobs for s in scheduled.seqs), default=0)
        sel, compiled_now, seconds = self.runner.run(scheduled.inputs, top_n=top_n)
        self.scheduler.commit(scheduled)
        finished += self._absorb(scheduled, sel, top_n)
        self._step_index += 1
        if self._trace:
            self._write_trace(scheduled, compiled_now, seconds)
        return finished

    def _absorb(self, scheduled: Scheduled, sel, top_n: int) -> list[RequestOutput]:
        finished = []
        row = 0
        for seq, samples in zip(scheduled.seqs, scheduled.samples):
            if not samples:
                continue
            r, row = row, row + 1
            if seq.request_id not in self._seqs:
                continue
            if self.config.check_finite and not sel.finite[r]:
                finished.append(self._finish(seq, "error", "non-finite logits"))
                continue
            if self.config.check_finite and not np.isfinite(sel.value[r]):
                # finite logits but a NaN/inf number for the sampled token (fp32 overflow in
                # processing): never hand the trainer a non-finite logprob
                finished.append(self._finish(seq, "error", "non-finite logprob"))
                continue
            token = int(sel.token[r])
            seq.tokens.append(token)
            seq.logprobs.append(float(sel.value[r]))
            seq.versions.append(self.policy_version)
            if seq.params.logprobs:
                n = seq.params.logprobs
                seq.top.append((sel.top_ids[r, :n].copy(), sel.top_values[r, :n].copy()))
            self._generated += 1
            reason = self._stop_reason(seq, token)
            if reason is None and seq.stop is not None:
                try:
                    reason = "stop" if seq.stop(seq.tokens[len(seq.prompt) :]) else None
                except Exception as e:  # a user callback must not take the engine down
                    finished.append(self._finish(seq, "error", f"stop callback raised {e!r}"))
                    continue
            if reason is not None:
                finished.append(self._finish(seq, reason))
        return finished

    def _write_trace(self, scheduled: Scheduled, compiled_now: bool, seconds: float) -> None:
        num_tokens, num_seqs = self.runner.bucket(len(scheduled.inputs.tokens))
        record = {
            "step": self._step_index - 1,
            "bucket_tokens": num_tokens,
            "bucket_seqs": num_seqs,
            "prefill_tokens": scheduled.num_prefill_tokens,
            "decode_tokens": scheduled.num_decode_tokens,
            "seqs": len(scheduled.seqs),
            "policy_version": self.policy_version,
            "compiled": compiled_now,
            "step_seconds": round(seconds, 6),
            "compile_seconds": round(seconds, 6) if compiled_now else 0.0,
            "pages_free": self.allocator.num_free,
            "preemptions": self.scheduler.num_preemptions,
        }
        self._trace.write(json.dumps(record) + "\n")
        self._trace.flush()

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        progress: bool | None = None,
    ) -> list[RequestOutput]:
        """Runs `prompts` to completion; outputs in prompt order.

        Everything is validated before the first request is queued. `progress` shows a tqdm bar
        (default: when stderr is a terminal).
        """
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise TypeError("prompts must be a list of token-id lists")
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling_params")
        if self.paused:  # checked before queuing anything: the requests could never finish
            raise RuntimeError("generate() on a paused engine would never finish; resume()")
        for i, (p, sp) in enumerate(zip(prompts, params)):
            try:
                self._validate_request(p, sp)
            except (TypeError, ValueError) as e:
                raise type(e)(f"prompts[{i}]: {e}") from None
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        pending = set(ids)
        results: dict[str, RequestOutput] = {}
        bar = None
        if progress or (progress is None and sys.stderr.isatty()):
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="generate", unit="req")
        try:
            while pending:
                if self.paused:
                    raise RuntimeError("generate() on a paused engine would never finish; resume()")
                for out in self.step():
                    if out.request_id in pending:
                        pending.discard(out.request_id)
                        results[out.request_id] = out
                        if bar:
                            bar.update(1)
        finally:
            if bar:
                bar.close()
        return [results[i] for i in ids]

    def warmup(self, with_top_logprobs: bool = False) -> int:
        """Compiles every bucket now; returns how many were compiled."""
        return self.runner.warmup(self.pages_per_seq, with_top_logprobs)

    # -- weights ----------------------------------------------------------------------------

    def _validate_params(self, params: Params) -> None:
        old = self.runner.params
        old_leaves, old_def = jax.tree_util.tree_flatten_with_path(old)
        new_leaves, new_def = jax.tree_util.tree_flatten_with_path(params)
        if old_def != new_def:
            old_names = [jax.tree_util.keystr(p) for p, _ in old_leaves]
            new_names = [jax.tree_util.keystr(p) for p, _ in new_leaves]
            missing = [n for n in old_names if n not in set(new_names)]
            extra = [n for n in new_names if n not in set(old_names)]
            raise ValueError(
                "update_weights: params tree structure differs: "
                f"missing leaves {missing[:10]}, unexpected leaves {extra[:10]}"
            )
        for (path, a), (_, b) in zip(old_leaves, new_leaves):
            name = jax.tree_util.keystr(path)
            if not hasattr(b, "shape") or tuple(b.shape) != tuple(a.shape):
                raise ValueError(f"update_weights: {name} has shape {getattr(b, 'shape', None)}, expected {a.shape}")
            if b.dtype != a.dtype:
                raise ValueError(f"update_weights: {name} has dtype {b.dtype}, expected {a.dtype}")
        finite = jax.tree_util.tree_map(lambda x: jnp.all(jnp.isfinite(x)), params)
        for (path, ok) in jax.tree_util.tree_flatten_with_path(finite)[0]:
            if not bool(ok):
                raise ValueError(f"update_weights: {jax.tree_util.keystr(path)} holds non-finite values")

    def update_weights(self, params: Params, mode: str = "keep") -> int:
        """Swaps in new params between steps; returns the new policy version.

        Validated first (tree structure, shapes, dtypes, all finite): a bad update raises and
        the old weights keep serving. Modes:
          keep:      KV cache kept; in-flight sequences continue under the new weights.
          recompute: in-flight sequences are re-prefilled under the new weights before their
                     next token (their KV pages are freed and recomputed).
          abort:     in-flight requests finish with finish_reason='aborted' and their partial
                     output; the next `step()` returns them.
        Prefix-cache keys carry the version, so later requests never reuse older KV.
        """
        if mode not in UPDATE_MODES:
            raise ValueError(f"mode={mode!r} must be one of {UPDATE_MODES}")
        self._validate_params(params)
        params = jax.tree_util.tree_map(
            lambda new, old: jax.device_put(new, old.sharding) if hasattr(old, "sharding") else new,
            params,
            self.runner.params,
        )
        self.runner.params = params
        self.model = Model(self.model.config, params)
        self.policy_version += 1
        self.scheduler.version = self.policy_version
        in_flight = [s for s in self.scheduler.running + self.scheduler.waiting]
        if mode == "recompute":
            for seq in in_flight:
                if seq.pages:
                    self.scheduler.preempt(seq)
                    self.scheduler.num_preemptions -= 1  # a recompute is not a preemption
        elif mode == "abort":
            self._undelivered += [self._finish(s, "aborted") for s in list(self._seqs.values())]
        return self.policy_version

    def pause(self) -> None:
        """Stops stepping (step() returns []) until `resume()`; state is kept."""
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    # -- introspection ----------------------------------------------------------------------

    @property
    def stats(self) -> dict[str, Any]:
        return {
            "compilations": len(self.runner.compiled),
            "compile_seconds": round(self.runner.compile_seconds, 3),
            "bucket_table_size": self.runner.bucket_table_size,
            "prefix_cache_hit_tokens": self.scheduler.prefix_hit_tokens,
            "preemptions": self.scheduler.num_preemptions,
            "num_pages": self.num_pages,
            "num_pages_free": self.allocator.num_free,
            "generated_tokens": self._generated,
            "steps": self._step_index,
            "policy_version": self.policy_version,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
        }

    def check_invariants(self) -> None:
        """Raises AssertionError if the page books do not balance (tests call this)."""
        self.allocator.check_invariants(self.scheduler.owners())

    def close(self) -> None:
        if self._trace:
            self._trace.close()
            self._trace = None
