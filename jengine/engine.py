"""The public engine: requests in, tokens with their exact logprobs and policy versions out.

    engine = Engine(model, EngineConfig())
    outs = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=8, seed=0))
    engine.update_weights(new_params)            # between steps; returns the new version

Guarantees (each tested): every returned logprob is bitwise `jengine.score(..., numerics=
engine.numerics)` of the same tokens with the same params; a request's tokens and logprobs do not
depend on its batch, the step budget, page size or placement, arrival order (given its seed),
prefix caching, preemption, or the tensor / data parallel layout (given `column_blocks`).

Layers: the engine owns one host-side `Scheduler` (with its `BlockAllocator`) per data-parallel
replica and one device-side `Runner`; a step plans every replica, runs their plans as one
device step, and commits the results back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jengine import plan as plan_lib
from jengine import sharding
from jengine.allocator import BlockAllocator
from jengine.config import EngineConfig, SamplingParams, check_choice
from jengine.models.transformer import Model, Params, param_shapes
from jengine.runner import Runner
from jengine.scheduler import Scheduled, Scheduler
from jengine.scheduler import Sequence as Seq
from jengine.tokenizer import IncrementalDetokenizer, Tokenizer

FINISH_REASONS = ("stop", "length", "aborted", "error")
UPDATE_MODES = ("keep", "recompute", "abort")
_PAUSED = "generate() on a paused engine would never finish; resume()"


class VerificationError(RuntimeError):
    """The runtime parity guard found a rollout logprob that `jengine.score` does not reproduce:
    a bug, or a hardware fault (`EngineConfig(verify_strict=True)`)."""


class DivergenceError(RuntimeError):
    """The processes of a multi-process run were about to run different steps (they were not
    given the same engine calls with the same arguments). Raised on every process."""


@dataclasses.dataclass
class RequestOutput:
    """A finished request.

    token_ids, logprobs (f32) and policy_versions (i32) are aligned: entry i is the i-th generated
    token, its number under the engine's `logprobs_mode`, and the policy version that produced it.
    top_logprobs: when `SamplingParams.logprobs = n > 0`, per token a list of n (token id, value)
    pairs, best first; else None.
    text: the generated text when the engine has a tokenizer (vLLM's: see `SamplingParams`).
    stop_reason: the stop token id or stop string that ended the request; None otherwise (EOS
    included, as in vLLM).
    num_cached_tokens: prompt tokens served from the prefix cache when the request was admitted.
    routed_experts: with `EngineConfig(return_routed_experts=True)`, i32[num_tokens,
    num_sparse_layers, k]: for generated token i, the experts (by rank) each sparse layer routed
    the row whose logits it was sampled from (the token before it) to; else None.
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: np.ndarray
    policy_versions: np.ndarray
    finish_reason: str | None  # None only in `Engine.partial_output` (still running)
    top_logprobs: list[list[tuple[int, float]]] | None = None
    error: str | None = None
    text: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    routed_experts: np.ndarray | None = None


def check_params(params: Params, shapes: Params, where: str, dtypes: Params | None = None) -> None:
    """Raises ValueError naming the first leaf of `params` whose place in the tree, shape or dtype
    differs from `shapes` (a tree of shape tuples) / `dtypes`, or that holds a non-finite value."""
    tu = jax.tree_util
    if isinstance(params, dict) and isinstance(params.get("layers"), list | tuple):
        raise ValueError(f"{where}: params['layers'] is a list of per-layer dicts; jengine stacks "
                         "each layer leaf on a leading [num_layers] axis: convert with "
                         "jengine.models.transformer.stack_layers(params)")  # fmt: skip
    want, want_def = tu.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    got, got_def = tu.tree_flatten_with_path(params)
    if got_def != want_def:
        want_names, got_names = ({tu.keystr(p) for p, _ in leaves} for leaves in (want, got))
        raise ValueError(f"{where}: params tree structure differs: missing leaves "
                         f"{sorted(want_names - got_names)[:10]}, unexpected leaves "
                         f"{sorted(got_names - want_names)[:10]}")  # fmt: skip
    want_dtypes = [None] * len(want) if dtypes is None else tu.tree_leaves(dtypes)
    for (path, leaf), (_, shape), dtype in zip(got, want, want_dtypes):
        name = tu.keystr(path)
        if tuple(getattr(leaf, "shape", ())) != tuple(shape):
            got_shape = getattr(leaf, "shape", None)
            raise ValueError(f"{where}{name} has shape {got_shape}, expected {shape}")
        if dtype is not None and leaf.dtype != dtype:
            raise ValueError(f"{where}{name} has dtype {leaf.dtype}, expected {dtype}")
    # one program for every leaf: on a multi-process mesh, many small programs in flight can
    # start their collectives in different orders on different processes and deadlock
    for (path, _), ok in zip(got, np.asarray(_all_finite(params))):
        if not ok:
            raise ValueError(f"{where}{tu.keystr(path)} holds non-finite values")


@jax.jit
def _all_finite(params: Params) -> jax.Array:
    """bool[leaves]: each leaf of `params` is all finite (x * 0 is 0, or NaN for inf and NaN: 3.5x
    faster on CPU than all(isfinite(x)); XLA's vectorised max of |x| can drop a NaN)."""
    return jnp.stack([jnp.isfinite(jnp.sum(x * 0.0, dtype=float)) for x in jax.tree.leaves(params)])


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

    `tokenizer`: a `jengine.Tokenizer`: outputs then carry their text, and requests may have stop
    strings. `mesh`: an optional ('data', 'model') `jax.sharding.Mesh` of shape (data_parallel_size,
    tensor_parallel_size); by default one is built from `jax.devices()` when tp * dp > 1.
    Data-parallel replica i serves the requests whose arrival index is i mod dp; all replicas step
    together in one device step. See `jengine.sharding` for why no layout changes a bit.

    A request id stays taken while it runs and for the next `FINISHED_IDS_KEPT` finished requests.
    """

    FINISHED_IDS_KEPT = 100_000

    def __init__(self, model: Model, config: EngineConfig | None = None, *, mesh: Any = None,
                 tokenizer: Tokenizer | None = None):  # fmt: skip
        if not isinstance(model, Model):
            raise TypeError(f"model must be a jengine Model, got {type(model).__name__}")
        config = config or EngineConfig()
        if not isinstance(config, EngineConfig):
            raise TypeError(f"config must be an EngineConfig, got {type(config).__name__}")
        mc = model.config
        check_params(model.params, param_shapes(mc), "model.params")
        max_model_len = config.max_model_len or mc.max_position_embeddings
        if max_model_len > mc.max_position_embeddings:
            raise ValueError(f"max_model_len={max_model_len} exceeds the model's "
                             f"max_position_embeddings={mc.max_position_embeddings}")  # fmt: skip
        self.numerics = config.resolved_numerics()
        tp, dp = config.tensor_parallel_size, config.data_parallel_size
        if tp * dp > 1 or mesh is not None:
            mesh = sharding.engine_mesh(config, mesh)
        if mesh is not None or self.numerics.column_blocks > 1:
            sharding.check_model(mc, tp, self.numerics.column_blocks)
        self.mesh = mesh if mesh is not None and mesh.size > 1 else None
        # a mesh over several processes steps in lockstep with them; a host-local engine (no mesh,
        # or a mesh over this process's devices) never talks to another process while stepping
        self.spans_processes = self.mesh is not None and len(
            {d.process_index for d in self.mesh.devices.flat}) > 1  # fmt: skip
        self.config, self.max_model_len, self.tokenizer = config, max_model_len, tokenizer
        self.pages_per_seq = -(-max_model_len // config.page_size)
        num_pages = config.num_pages
        if num_pages is None:
            page_bytes = (2 * mc.num_layers * config.page_size * mc.num_kv_heads * mc.head_dim
                          * jnp.dtype(model.params["embed"].dtype).itemsize)  # fmt: skip
            want = config.max_num_seqs * self.pages_per_seq
            num_pages = max(1, min(want, _kv_budget_bytes() // page_bytes))
        self.num_pages = num_pages  # per replica
        self.runner = Runner(
            model, self.numerics, logprobs_mode=config.logprobs_mode, num_pages=num_pages,
            page_size=config.page_size, max_tokens=config.max_num_batched_tokens,
            max_seqs=config.max_num_seqs, min_tokens=config.min_token_bucket, mesh=self.mesh,
            routing=config.return_routed_experts,
        )  # fmt: skip
        self.schedulers = [
            Scheduler(BlockAllocator(num_pages, config.page_size, config.enable_prefix_caching),
                      max_num_seqs=config.max_num_seqs, pages_per_seq=self.pages_per_seq,
                      max_num_batched_tokens=config.max_num_batched_tokens)
            for _ in range(dp)
        ]  # fmt: skip
        self.policy_version, self.paused = 0, False
        self._arrivals = itertools.count()
        self._seqs: dict[str, Seq] = {}
        self._finished_ids: dict[str, None] = {}  # the last FINISHED_IDS_KEPT, oldest first
        self._undelivered: list[RequestOutput] = []  # finished outside step(), returned by it
        self._to_verify: list[tuple[RequestOutput, SamplingParams]] = []
        self._step_index = self._generated = self._verified = self._verify_mismatches = 0
        self._traced_hits = 0  # prefix-cache hit tokens up to the last traced step
        self._trace = open(config.trace_path, "w") if config.trace_path else None

    @property
    def model(self) -> Model:
        """The model as the engine serves it now (params placed on its devices)."""
        return Model(self.runner.config, self.runner.params)

    # -- requests ---------------------------------------------------------------------------

    def _validate_prompt(self, prompt: Any) -> list[int]:
        prompt = plan_lib.check_token_ids("prompt_token_ids", prompt, self.runner.config.vocab_size)
        if len(prompt) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt)} tokens; max_model_len={self.max_model_len} "
                             "leaves no room for a completion")  # fmt: skip
        return prompt

    def _validate_request(self, prompt: Any, params: Any) -> tuple[list, SamplingParams, int]:
        """Checks one request without changing any state; returns (prompt, params, max_len)."""
        prompt = self._validate_prompt(prompt)
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        vocab = self.runner.config.vocab_size
        if bad := [t for t in params.stop_token_ids if t >= vocab]:
            raise ValueError(f"stop_token_ids holds {bad}, outside [0, {vocab})")
        if params.stop and self.tokenizer is None:
            raise ValueError(f"stop={params.stop!r} needs the text: give the engine a tokenizer "
                             "(Engine(..., tokenizer=jengine.load_tokenizer(path)))")  # fmt: skip
        max_len = min(len(prompt) + params.max_tokens, self.max_model_len)
        pages_needed = -(-max_len // self.config.page_size)
        if pages_needed > self.num_pages:
            raise ValueError(f"request needs up to {pages_needed} KV pages ({max_len} tokens) but "
                             f"the pool has {self.num_pages}: it could never run; raise num_pages "
                             "or lower max_tokens")  # fmt: skip
        return prompt, params, max_len

    def add_request(self, prompt_token_ids: Sequence[int],
                    sampling_params: SamplingParams | None = None, request_id: str | None = None,
                    *, stop: Callable[[list[int]], bool] | None = None) -> str:  # fmt: skip
        """Queues a request; returns its id. Validates everything before anything is queued.

        `stop`, if given, is called with the generated token ids after every new token; True
        finishes the request with finish_reason='stop'. An exception it raises finishes only this
        request, with finish_reason='error'.
        """
        prompt, params, max_len = self._validate_request(prompt_token_ids, sampling_params)
        if stop is not None and not callable(stop):
            raise TypeError(f"stop={stop!r} must be callable")
        taken = lambda rid: rid in self._seqs or rid in self._finished_ids  # noqa: E731
        if request_id is not None:
            if not isinstance(request_id, str) or not request_id:
                raise TypeError(f"request_id={request_id!r} must be a non-empty str")
            if taken(request_id):
                raise ValueError(f"request_id={request_id!r} is already in use")
        arrival = next(self._arrivals)
        if request_id is None:
            request_id, k = f"req-{arrival}", 0
            while taken(request_id):  # a caller already used this id: never overwrite it
                k += 1
                request_id = f"req-{arrival}-{k}"
        seed = params.seed
        if seed is None:
            seed = (self.config.seed * 1_000_003 + arrival) % (2**31)
        replica = arrival % len(self.schedulers)
        seq = Seq(request_id, arrival, prompt, params, seed, max_len, stop, replica)
        if self.tokenizer is not None:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, prompt, params.stop,
                                                     params.include_stop_str_in_output)  # fmt: skip
        self._seqs[request_id] = seq
        self.schedulers[replica].add(seq)
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Ends a request now with finish_reason='aborted'; returns its partial output, None if it
        already finished (a no-op). Raises KeyError for an id the engine never saw."""
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
        self.schedulers[seq.replica].release(seq)
        del self._seqs[seq.request_id]
        self._finished_ids[seq.request_id] = None
        if len(self._finished_ids) > self.FINISHED_IDS_KEPT:
            del self._finished_ids[next(iter(self._finished_ids))]
        seq.finish_reason = reason
        out = self._output(seq, reason, error)
        if self._verify_selects(seq, reason):
            self._to_verify.append((out, seq.params))
        return out

    def _output(self, seq: Seq, reason: str | None, error: str | None = None, start: int = 0):
        top = [list(zip(i.tolist(), v.tolist())) for i, v in seq.top[start:]]
        return RequestOutput(
            request_id=seq.request_id, prompt_token_ids=list(seq.prompt),
            token_ids=seq.tokens[len(seq.prompt) + start :], finish_reason=reason,
            logprobs=np.asarray(seq.logprobs[start:], np.float32),
            policy_versions=np.asarray(seq.versions[start:], np.int32),
            top_logprobs=top if seq.params.logprobs else None, error=error,
            text=seq.detokenizer.text if seq.detokenizer else None, stop_reason=seq.stop_reason,
            num_cached_tokens=seq.num_cached_tokens or 0,
            routed_experts=np.stack(seq.routed[start:]).astype(np.int32) if seq.routed[start:]
            else None,
        )  # fmt: skip

    def partial_output(self, request_id: str, start: int = 0) -> RequestOutput | None:
        """A running request's tokens from generated token `start` on, finish_reason None (a
        server streams these); None if none past `start`. KeyError once it finished (step())."""
        seq = self._seqs[request_id]
        return self._output(seq, None, start=start) if seq.num_generated > start else None

    def _verify_selects(self, seq: Seq, reason: str) -> bool:
        """The parity guard checks a deterministic `verify_fraction` of the finished requests
        (the same ones on every process) whose KV and tokens all come from the current weights."""
        f = self.config.verify_fraction
        if not f or reason not in ("stop", "length"):
            return False
        if any(v != self.policy_version for v in [seq.kv_version, *seq.versions]):
            return False
        h = hashlib.blake2b(f"{self.config.seed}:{seq.arrival}".encode(), digest_size=8)
        return int.from_bytes(h.digest(), "little") < f * 2**64

    def _verify(self) -> list[str]:
        """Re-scores the selected finished requests; returns the ids whose logprobs differ."""
        from jengine.scoring import score

        todo, self._to_verify = self._to_verify, []
        if not todo:
            return []
        scored = score(
            self.model, [o.prompt_token_ids for o, _ in todo], [o.token_ids for o, _ in todo],
            [sp for _, sp in todo], numerics=self.numerics, logprobs_mode=self.config.logprobs_mode,
        )  # fmt: skip
        bad = [o.request_id for (o, _), s in zip(todo, scored)
               if not np.array_equal(s.view(np.uint32), o.logprobs.view(np.uint32))]  # fmt: skip
        self._verified += len(todo)
        self._verify_mismatches += len(bad)
        if bad and self.config.verify_strict:
            raise VerificationError(
                f"step {self._step_index - 1}: rollout logprobs of {bad} differ from jengine.score "
                "under the engine's numerics and weights (a bug or a hardware fault)"
            )
        return bad

    def _stop_reason(self, seq: Seq, token: int) -> str | None:
        """'stop' (EOS, a stop token id, a stop string), 'length' or None after `token`; the text
        grows by the token's (vLLM's rules: `SamplingParams`)."""
        p, eos, reason = seq.params, self.runner.config.eos_token_ids, None
        if not p.ignore_eos and token in eos:
            reason = "stop"
        elif token in p.stop_token_ids:
            reason, seq.stop_reason = "stop", token
        elif seq.num_generated >= p.max_tokens or len(seq.tokens) >= seq.max_len:
            reason = "length"
        if seq.detokenizer is not None:
            decode = reason != "stop" or p.include_stop_str_in_output
            if (found := seq.detokenizer.push(token, decode)) is not None:
                reason, seq.stop_reason = "stop", found
        return reason

    def step(self) -> list[RequestOutput]:
        """Runs one engine step; returns the requests that finished in it (none while paused)."""
        if self.paused:
            return []
        finished, self._undelivered = self._undelivered, []
        planned = [s.schedule() for s in self.schedulers]
        if all(p is None for p in planned):
            return finished
        empty = plan_lib.build([], self.config.page_size, self.pages_per_seq)
        top_n = max((s.params.logprobs for p in planned if p for s in p.seqs), default=0)
        plans = [p.plan if p else empty for p in planned]
        if self.config.check_divergence and self.spans_processes:
            self._check_processes_agree(plans, top_n)
        sels, compiled_now, seconds = self.runner.run(plans, top_n=top_n)
        for scheduler, scheduled, sel in zip(self.schedulers, planned, sels):
            if scheduled is not None:
                scheduler.commit(scheduled)
                finished += self._absorb(scheduled, sel)
        self._step_index += 1
        mismatches = self._verify()
        if self._trace:
            self._write_trace([p for p in planned if p], compiled_now, seconds, mismatches)
        return finished

    def _check_processes_agree(self, plans: list[plan_lib.StepPlan], top_n: int) -> None:
        """Raises DivergenceError on every process if this step's digest (plans, live request
        ids, policy version) differs across processes: different plans would hang in a
        collective or silently compute different things."""
        from jax.experimental import multihost_utils

        h = hashlib.blake2b(digest_size=16)
        for p in plans:
            h.update(p.digest().encode())
        h.update(json.dumps(sorted(self._seqs)).encode())
        counts = [self._step_index, self.policy_version, sum(p.num_tokens for p in plans),
                  len(self._seqs), top_n]  # fmt: skip
        mine = np.concatenate([np.frombuffer(h.digest(), np.uint32), np.asarray(counts, np.uint32)])
        every = np.asarray(multihost_utils.process_allgather(mine))
        if (every != every[0]).any():
            lines = [f"process {i}: step {r[4]}, policy version {r[5]}, {r[6]} tokens, {r[7]} live "
                     f"requests, top_n {r[8]}, plan digest {r[:4].tobytes().hex()}"
                     for i, r in enumerate(every)]  # fmt: skip
            raise DivergenceError(f"step {self._step_index}: the processes' step plans differ "
                                  "(every process must make the same engine calls with the same "
                                  "arguments):\n  " + "\n  ".join(lines))  # fmt: skip

    def _absorb(self, scheduled: Scheduled, sel) -> list[RequestOutput]:
        finished = []
        row = 0
        for seq, samples in zip(scheduled.seqs, scheduled.samples):
            if not samples:
                continue
            r, row = row, row + 1
            if seq.request_id not in self._seqs:
                continue
            # finite logits can still give a NaN/inf number for the sampled token (fp32 overflow in
            # processing): never hand the trainer a non-finite logprob
            if self.config.check_finite and not (sel.finite[r] and np.isfinite(sel.value[r])):
                why = "non-finite logits" if not sel.finite[r] else "non-finite logprob"
                finished.append(self._finish(seq, "error", why))
                continue
            token = int(sel.token[r])
            seq.tokens.append(token)
            seq.logprobs.append(float(sel.value[r]))
            seq.versions.append(self.policy_version)
            if n := seq.params.logprobs:
                seq.top.append((sel.top_ids[r, :n].copy(), sel.top_values[r, :n].copy()))
            if sel.routing is not None:
                seq.routed.append(sel.routing[r].copy())
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

    def _write_trace(self, planned: list[Scheduled], compiled_now: bool, seconds: float,
                     mismatches: list[str]) -> None:  # fmt: skip
        num_tokens, num_seqs = self.runner.bucket(max(p.plan.num_tokens for p in planned))
        record = dict(
            step=self._step_index - 1, bucket_tokens=num_tokens, bucket_seqs=num_seqs,
            prefill_tokens=sum(p.num_prefill_tokens for p in planned),
            decode_tokens=sum(p.num_decode_tokens for p in planned),
            seqs=sum(len(p.seqs) for p in planned), policy_version=self.policy_version,
            compiled=compiled_now, step_seconds=round(seconds, 6),
            compile_seconds=round(seconds, 6) if compiled_now else 0.0,
            pages_free=sum(s.allocator.num_free for s in self.schedulers),
            preemptions=sum(s.num_preemptions for s in self.schedulers),
            cached_tokens=sum(s.prefix_hit_tokens for s in self.schedulers) - self._traced_hits,
        )  # fmt: skip
        self._traced_hits += record["cached_tokens"]
        if mismatches:
            record["verify_mismatches"] = mismatches
        self._trace.write(json.dumps(record) + "\n")
        self._trace.flush()

    def generate(self, prompts: Sequence[Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 progress: bool | None = None) -> list[RequestOutput]:  # fmt: skip
        """Runs `prompts` to completion; outputs in prompt order. Everything is validated before
        the first request is queued. `progress`: a tqdm bar on stderr (default: when a terminal)."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise TypeError("prompts must be a list of token-id lists")
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling_params")
        if self.paused:  # checked before queuing anything: the requests could never finish
            raise RuntimeError(_PAUSED)
        for i, (p, sp) in enumerate(zip(prompts, params)):
            try:
                self._validate_request(p, sp)
            except (TypeError, ValueError) as e:
                raise type(e)(f"prompts[{i}]: {e}") from None
        from tqdm.auto import tqdm

        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        pending, results = set(ids), {}
        show = progress or (progress is None and sys.stderr.isatty())
        with tqdm(total=len(ids), desc="generate", unit="req", disable=not show) as bar:
            while pending:
                if self.paused:
                    raise RuntimeError(_PAUSED)
                for out in self.step():
                    if out.request_id in pending:
                        pending.discard(out.request_id)
                        results[out.request_id] = out
                        bar.update(1)
        return [results[i] for i in ids]

    def warmup(self, with_top_logprobs: bool = False, threads: int | None = None,
               progress: bool | None = None) -> dict[tuple[int, int, int], float]:  # fmt: skip
        """Compiles every bucket not compiled yet (`threads` at a time; default one per CPU core,
        at most 4) with a progress bar on stderr (default: when a terminal). Returns
        {(token bucket, sequence bucket, top_n): compile seconds} of the buckets compiled now
        (0.0 for a step another engine of this process had compiled).
        With JAX's persistent compilation cache configured, a restart loads them instead."""
        return self.runner.warmup(self.pages_per_seq, with_top_logprobs, threads, progress)

    # -- weights ----------------------------------------------------------------------------

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
        check_choice("mode", mode, UPDATE_MODES)
        old, tree_map = self.runner.params, jax.tree_util.tree_map
        check_params(params, tree_map(lambda x: tuple(x.shape), old), "update_weights: ",
                     tree_map(lambda x: x.dtype, old))  # fmt: skip
        self.runner.set_params(params)
        self.policy_version += 1
        for scheduler in self.schedulers:
            scheduler.version = self.policy_version
            if mode == "recompute":
                for seq in scheduler.running + scheduler.waiting:
                    if seq.pages:
                        scheduler.preempt(seq)
                        scheduler.num_preemptions -= 1  # a recompute is not a preemption
        if mode == "abort":
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
        """Counters of the engine (summed over data-parallel replicas; `num_pages` is the total)."""
        total = lambda f: sum(f(s) for s in self.schedulers)  # noqa: E731
        return dict(
            compilations=len(self.runner.compiled),
            compile_seconds=round(self.runner.compile_seconds, 3),
            bucket_table_size=self.runner.bucket_table_size,
            prefix_cache_hit_tokens=total(lambda s: s.prefix_hit_tokens),
            preemptions=total(lambda s: s.num_preemptions),
            num_pages=self.num_pages * len(self.schedulers),
            num_pages_free=total(lambda s: s.allocator.num_free),
            generated_tokens=self._generated, steps=self._step_index,
            policy_version=self.policy_version, running=total(lambda s: len(s.running)),
            waiting=total(lambda s: len(s.waiting)), verified_requests=self._verified,
            verify_mismatches=self._verify_mismatches,
        )  # fmt: skip

    def check_invariants(self) -> None:
        """Raises AssertionError if any replica's page books do not balance (tests call this)."""
        for s in self.schedulers:
            s.allocator.check_invariants(s.owners())

    def close(self) -> None:
        if self._trace:
            self._trace.close()
            self._trace = None
