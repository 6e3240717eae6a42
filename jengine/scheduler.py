"""Continuous batching: which tokens of which sequences run in the next step.

Deterministic by construction: running sequences are served in admission order, waiting ones are
admitted first-come-first-served by arrival index, and when pages run out the most recently
admitted running sequence is preempted (its pages freed, its tokens recomputed later). Because
every kernel is batch-invariant and sampling noise depends on (seed, position) only, none of
these decisions changes a single output bit; they only change speed.

Host-side only (no jax): a step is planned as a `plan.StepPlan`, run by whatever executes plans
(the engine's device runner, or a fake step in the tests), and committed back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from jengine import plan
from jengine.allocator import BlockAllocator, OutOfPages, PageKey, page_keys
from jengine.config import SamplingParams


@dataclasses.dataclass(eq=False)
class Sequence:
    """One request's state. `tokens` = prompt + generated so far."""

    request_id: str
    arrival: int
    prompt: list[int]
    params: SamplingParams
    seed: int
    max_len: int  # prompt + completion may not exceed this
    stop: Callable[[list[int]], bool] | None = None
    replica: int = 0  # the data-parallel replica (scheduler) that serves it
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    versions: list[int] = dataclasses.field(default_factory=list)
    top: list[tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=list)
    routed: list[np.ndarray] = dataclasses.field(default_factory=list)  # i32[sparse layers, k]
    pages: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in `pages`
    kv_version: int = 0  # policy version the first computed page was keyed under
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    detokenizer: Any = None  # a tokenizer.IncrementalDetokenizer when the engine has a tokenizer
    num_cached_tokens: int | None = None  # prompt tokens the prefix cache served at admission

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt)

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - len(self.prompt)


@dataclasses.dataclass
class Scheduled:
    """One planned step: which sequence feeds how many tokens, which of them sample (in the order
    of the plan's logit rows), and the step plan itself."""

    seqs: list[Sequence]
    num_new: list[int]
    samples: list[bool]
    plan: plan.StepPlan
    num_prefill_tokens: int
    num_decode_tokens: int


class Scheduler:
    def __init__(self, allocator: BlockAllocator, *, max_num_seqs: int,
                 max_num_batched_tokens: int, pages_per_seq: int):  # fmt: skip
        self.allocator, self.page_size = allocator, allocator.page_size
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.pages_per_seq = pages_per_seq
        self.waiting: list[Sequence] = []  # sorted by arrival
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0
        self.prefix_hit_tokens = 0
        self.version = 0  # current policy version (prefix-cache keys)

    # -- queue management -------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self.waiting.sort(key=lambda s: s.arrival)

    def release(self, seq: Sequence) -> None:
        """Frees a sequence's pages and drops it from the queues."""
        self.allocator.free(seq.pages)
        seq.pages, seq.num_computed = [], 0
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)

    def preempt(self, seq: Sequence) -> None:
        """Frees `seq`'s pages and puts it back in the waiting queue, to be recomputed."""
        self.release(seq)
        self.num_preemptions += 1
        self.add(seq)

    def owners(self) -> dict[str, list[int]]:
        return {s.request_id: s.pages for s in self.running + self.waiting if s.pages}

    # -- planning ---------------------------------------------------------------------------

    def _grow(self, seq: Sequence, budget: int) -> int:
        """Ensures `seq` owns pages for its next n = min(uncomputed tokens, budget) tokens and
        returns n (raises OutOfPages)."""
        n = min(len(seq.tokens) - seq.num_computed, budget)
        need = -(-(seq.num_computed + n) // self.page_size) - len(seq.pages)
        if need > 0:
            seq.pages.extend(self.allocator.allocate(need))
        return n

    def _cacheable_keys(self, seq: Sequence) -> list[PageKey]:
        """Prefix keys of `seq`'s full pages, never covering its last token."""
        keys = page_keys(seq.tokens, self.page_size, self.version)
        return keys[: (len(seq.tokens) - 1) // self.page_size]

    def _admit(self, seq: Sequence, keys: list[PageKey]) -> None:
        """Prefix-cache lookup for a sequence about to run (`keys`: its `_cacheable_keys`)."""
        seq.pages = self.allocator.lookup(keys)
        seq.num_computed = len(seq.pages) * self.page_size
        seq.kv_version = self.version
        self.prefix_hit_tokens += seq.num_computed

    def _keys_registered_by(self, seq: Sequence, n: int) -> list[PageKey]:
        """Prefix keys of the pages `seq` fills by computing `n` more tokens, from page
        `num_computed // page_size` on; none when its KV is keyed under an older version."""
        before = seq.num_computed // self.page_size
        after = (seq.num_computed + n) // self.page_size
        if after <= before or seq.kv_version != self.version:
            return []
        keys = page_keys(seq.tokens[: after * self.page_size], self.page_size, self.version)
        return keys[before:after]

    def schedule(self) -> Scheduled | None:
        """Plans the next step, preempting as needed. None when there is nothing to run."""
        budget = self.max_num_batched_tokens
        planned: list[tuple[Sequence, int]] = []
        # 1. running sequences, oldest admission first; preempt the newest when pages run out
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            try:
                n = self._grow(seq, budget)
            except OutOfPages:
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
                continue
            planned.append((seq, n))
            budget -= n
            i += 1
        # 2. admit waiting sequences, first come first served, while seats, budget and pages last.
        # A sequence whose next uncached prefix page is being computed in this very step by a
        # sequence already planned (a GRPO sibling: same prompt) waits one step and then reads
        # that page from the prefix cache instead of computing it again.
        in_flight = {k for seq, n in planned for k in self._keys_registered_by(seq, n)}
        deferred: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.pop(0)
            keys = self._cacheable_keys(seq)
            num_hits = self.allocator.num_cached(keys)
            if num_hits < len(keys) and keys[num_hits] in in_flight:
                deferred.append(seq)
                continue
            self._admit(seq, keys)
            try:
                n = self._grow(seq, budget)
            except OutOfPages:
                self.allocator.free(seq.pages)
                self.prefix_hit_tokens -= seq.num_computed
                seq.pages, seq.num_computed = [], 0
                self.waiting.insert(0, seq)
                break
            self.running.append(seq)
            if seq.num_cached_tokens is None:  # first admission (not a preempted one's return)
                seq.num_cached_tokens = seq.num_computed
            planned.append((seq, n))
            in_flight.update(self._keys_registered_by(seq, n))
            budget -= n
        self.waiting[:0] = deferred  # still in arrival order, ahead of every later arrival
        return self._build(planned) if planned else None

    def _build(self, planned: list[tuple[Sequence, int]]) -> Scheduled:
        chunks, samples = [], []
        prefill = decode = 0
        for seq, n in planned:
            start = seq.num_computed
            is_last = start + n == len(seq.tokens)
            samples.append(is_last)
            if n == 1 and seq.num_generated > 0 and is_last:
                decode += 1
            else:
                prefill += n
            rows = [plan.Row(n - 1, seq.params, seq.seed, len(seq.tokens))] if is_last else []
            chunks.append(plan.Chunk(seq.tokens[start : start + n], start, seq.pages, rows))
        return Scheduled([s for s, _ in planned], [n for _, n in planned], samples,
                         plan.build(chunks, self.page_size, self.pages_per_seq), prefill, decode)

    def commit(self, scheduled: Scheduled) -> None:
        """Marks the planned tokens computed and registers newly full pages in the prefix cache."""
        for seq, n in zip(scheduled.seqs, scheduled.num_new):
            first = seq.num_computed // self.page_size
            for idx, key in enumerate(self._keys_registered_by(seq, n), start=first):
                self.allocator.register(seq.pages[idx], key)
            seq.num_computed += n
