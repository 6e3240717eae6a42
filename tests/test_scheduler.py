"""The host layer alone, with no jax: the scheduler driven by a fake step.

The fake device keeps a "KV cache" of (token, policy version) per slot: a step writes each plan
token into its slot, and each logit row's next token is a hash of every (token, version) its
sequence can see through the page table, in logical order. A request's tokens therefore equal the
reference (the same hash over its own prefix) only if every plan is right: positions, slots, page
tables, chunk boundaries, prefix-cache hits, preemption and the version guard on cached pages.
"""

from __future__ import annotations

import numpy as np
import pytest

from jengine import plan as plan_lib
from jengine.allocator import BlockAllocator
from jengine.config import SamplingParams
from jengine.scheduler import Scheduler, Sequence

VOCAB = 97


def next_token(seen: list[tuple[int, int]], seed: int, position: int) -> int:
    h = seed * 31 + position
    for i, (tok, version) in enumerate(seen):
        h = (h * 1_000_003 + (i + 1) * tok + 7919 * version) % (2**31)
    return h % VOCAB


class FakeDevice:
    """Executes plans against a numpy (token, version) cache of `num_pages * page_size` slots."""

    def __init__(self, num_pages: int, page_size: int):
        self.page_size = page_size
        self.kv = np.full((num_pages * page_size, 2), -1, np.int64)
        self.version = 0

    def run(self, plan: plan_lib.StepPlan) -> list[int]:
        assert np.all(plan.positions >= 0) and plan.num_tokens == len(plan.slots)
        assert len(set(plan.slots.tolist())) == len(plan.slots), "two tokens write one slot"
        self.kv[plan.slots, 0] = plan.tokens
        self.kv[plan.slots, 1] = self.version
        out = []
        ps = self.page_size
        for r, t in enumerate(plan.logit_rows):
            s, pos = plan.seq_ids[t], plan.positions[t]
            slots = [plan.page_table[s, p // ps] * ps + p % ps for p in range(pos + 1)]
            seen = [tuple(map(int, x)) for x in self.kv[slots]]
            assert all(tok >= 0 for tok, _ in seen), "read a slot nobody wrote"
            assert plan.rows.position[r] == pos + 1
            out.append(next_token(seen, int(plan.rows.seed[r]), int(plan.rows.position[r])))
        return out


def reference(prompt: list[int], max_tokens: int, seed: int, version: int = 0) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token([(t, version) for t in tokens], seed, len(tokens)))
    return tokens[len(prompt) :]


class Harness:
    """A scheduler, its allocator and a fake device, stepped like the engine steps them."""

    def __init__(self, *, num_pages, page_size, max_num_seqs, budget, pages_per_seq,
                 prefix_caching=True):  # fmt: skip
        self.allocator = BlockAllocator(num_pages, page_size, prefix_caching)
        self.sched = Scheduler(self.allocator, max_num_seqs=max_num_seqs,
                               max_num_batched_tokens=budget, pages_per_seq=pages_per_seq)  # fmt: skip
        self.device = FakeDevice(num_pages, page_size)
        self.arrivals = 0

    def add(self, prompt: list[int], max_tokens: int, seed: int) -> Sequence:
        seq = Sequence(f"r{self.arrivals}", self.arrivals, list(prompt),
                       SamplingParams(max_tokens=max_tokens), seed, len(prompt) + max_tokens)  # fmt: skip
        self.arrivals += 1
        self.sched.add(seq)
        return seq

    def update(self, mode: str) -> None:
        self.device.version = self.sched.version = self.sched.version + 1
        if mode == "recompute":
            for seq in self.sched.running + self.sched.waiting:
                if seq.pages:
                    self.sched.preempt(seq)

    def step(self) -> None:
        scheduled = self.sched.schedule()
        assert scheduled is not None, "live requests but nothing scheduled"
        tokens = iter(self.device.run(scheduled.plan))
        self.sched.commit(scheduled)
        for seq, samples in zip(scheduled.seqs, scheduled.samples):
            if samples:
                seq.tokens.append(next(tokens))
                if seq.num_generated == seq.params.max_tokens:
                    self.sched.release(seq)
                    seq.finish_reason = "length"
        self.allocator.check_invariants(self.sched.owners())

    def run(self, seqs: list[Sequence]) -> None:
        while any(s.finish_reason is None for s in seqs):
            self.step()


def drive(requests, *, update_at=None, **cfg):
    """Runs `requests` [(prompt, max_tokens, seed)] to completion; returns (outputs, scheduler).
    `update_at`: (step, mode) bumps the policy version before that step."""
    pages_per_seq = max(-(-(len(p) + n) // cfg["page_size"]) for p, n, _ in requests)
    h = Harness(pages_per_seq=pages_per_seq, **cfg)
    seqs = [h.add(*r) for r in requests]
    step = 0
    while any(s.finish_reason is None for s in seqs):
        if update_at and step == update_at[0]:
            h.update(update_at[1])
        h.step()
        step += 1
    assert h.allocator.num_free == h.allocator.num_pages, "pages leaked"
    return [s.tokens[len(s.prompt) :] for s in seqs], h.sched


def _requests(seed: int, n: int = 10):
    rng = np.random.default_rng(seed)
    shared = list(map(int, rng.integers(0, VOCAB, 37)))
    reqs = [(shared, 6, 100 + i) for i in range(4)]  # a GRPO group
    reqs += [(list(map(int, rng.integers(0, VOCAB, int(k)))), int(m), i)
             for i, (k, m) in enumerate(zip(rng.integers(1, 70, n - 4), rng.integers(1, 12, n - 4)))]  # fmt: skip
    return reqs


@pytest.mark.parametrize(
    "cfg",
    [
        dict(num_pages=200, page_size=16, max_num_seqs=16, budget=512),  # one big batch
        dict(num_pages=200, page_size=4, max_num_seqs=3, budget=16),  # small chunks, few seats
        dict(num_pages=14, page_size=8, max_num_seqs=8, budget=64),  # preemption
        dict(num_pages=14, page_size=8, max_num_seqs=8, budget=64, prefix_caching=False),
    ],
    ids=["big-batch", "small-chunks", "preemption", "no-prefix-cache"],
)
def test_every_plan_is_consistent_with_the_reference(cfg):
    reqs = _requests(0)
    outs, sched = drive(reqs, **cfg)
    for (prompt, n, seed), out in zip(reqs, outs):
        assert out == reference(prompt, n, seed)
    if cfg["num_pages"] == 14:
        assert sched.num_preemptions > 0
    if cfg.get("prefix_caching", True) and cfg["page_size"] <= 16:
        assert sched.prefix_hit_tokens > 0


def test_recompute_update_gives_the_new_policy_everywhere():
    reqs = _requests(1)
    outs, _ = drive(reqs, num_pages=200, page_size=8, max_num_seqs=16, budget=512,
                    update_at=(0, "recompute"))  # fmt: skip
    for (prompt, n, seed), out in zip(reqs, outs):
        assert out == reference(prompt, n, seed, version=1)


def test_pages_filled_under_an_old_version_are_never_served_under_the_new_key():
    """Keep-mode update while A is decoding inside page 1 (positions 8-11 computed under the old
    weights). A sibling S then computes page 0 under the new weights and registers it; A goes on
    to fill page 1. Page 1 holds old-version KV, so it must not be registered under the new
    version's key chain: a later request L with A's first 17 tokens may reuse S's page 0 only."""
    h = Harness(num_pages=64, page_size=8, max_num_seqs=4, budget=64, pages_per_seq=8)
    a = h.add(list(range(3, 15)), 10, seed=1)  # 12 prompt tokens: page 0 full, page 1 partial
    h.step()  # A's prefill and first token, under version 0
    h.update("keep")
    s = h.add(a.tokens[:9], 10, seed=2)  # its page 0 (new version) is registered, and kept
    while a.num_computed < 16:
        h.step()
    late = h.add(a.tokens[:17], 3, seed=3)
    h.step()
    assert h.sched.prefix_hit_tokens == 8, "L hit a page filled under the old version"
    h.run([a, s, late])
    assert late.tokens[17:] == reference(a.tokens[:17], 3, seed=3, version=1)
