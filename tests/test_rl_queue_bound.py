"""`rl.RolloutActor`'s documented bound, counted directly: groups pulled from the source and not
yet taken by `get()` never exceed `queue_size` (jengine/rl/pipeline.py: a new group is admitted
only while fewer than `queue_size` groups are in flight or finished but not yet taken).

Deterministic, not timing dependent: the source counts its pulls (on the actor thread) and the
trainer counts a `get()` before calling it (so `pulls - gets` can only overstate what is
outstanding, never understate it). The trainer is slow in the simplest way: it takes nothing
until the actor has blocked (nothing running, no room: it idles, and only a `get()` can change
that), then takes one group and waits until the actor has blocked again. `max_in_flight` is
larger than `queue_size`, so the queue bound alone is what stops the actor.
"""

from __future__ import annotations

import itertools
import threading
import time

from jengine import Engine, EngineConfig, SamplingParams, rl

# test_rl_pipeline.py's config: the same compiled programs
CONFIG = EngineConfig(max_model_len=64, max_num_seqs=8, max_num_batched_tokens=64)
QUEUE_SIZE = 2
MAX_IN_FLIGHT = QUEUE_SIZE + 2
TAKES = 3
DEADLINE_S = 300.0  # for the first wait: it includes compiling the engine's step


class CountingSource:
    """An endless source of one-sample groups that records, at every pull, how many groups would
    then be outstanding (pulled and not yet requested by a `get()`)."""

    def __init__(self):
        self.pulls = 0
        self.gets = 0  # incremented by the trainer before each get()
        self.outstanding: list[int] = []
        self._lock = threading.Lock()

    def __iter__(self):
        for k in itertools.count():
            with self._lock:
                self.pulls += 1
                self.outstanding.append(self.pulls - self.gets)
            prompt = [2 + k % 50, 3, 4]
            yield rl.GroupRequest(prompt, [SamplingParams(temperature=0.9, max_tokens=2, seed=k)])

    def got(self) -> None:
        with self._lock:
            self.gets += 1


def _wait_until_blocked(actor: rl.RolloutActor, source: CountingSource, pulls: int) -> None:
    """Waits until the source was pulled at least `pulls` times and then the actor idled: it
    found no room and nothing to run after that pull, so it stays put until the next get()."""
    deadline = time.monotonic() + DEADLINE_S
    while source.pulls < pulls:
        assert time.monotonic() < deadline, (source.pulls, pulls, dict(actor.stats))
        assert actor._thread.is_alive(), actor._error
        time.sleep(0.01)
    idle = actor.stats["idle_seconds"]
    while actor.stats["idle_seconds"] == idle:
        assert time.monotonic() < deadline, (source.pulls, dict(actor.stats))
        assert actor._thread.is_alive(), actor._error
        time.sleep(0.01)


def test_groups_outstanding_never_exceed_queue_size(tiny_model):
    source = CountingSource()
    engine = Engine(tiny_model, CONFIG)
    with rl.RolloutActor(engine, source, max_in_flight=MAX_IN_FLIGHT,
                         queue_size=QUEUE_SIZE) as actor:  # fmt: skip
        for taken in range(TAKES + 1):
            _wait_until_blocked(actor, source, taken + QUEUE_SIZE)
            # blocked: exactly queue_size groups outstanding (the bound, and no fewer)
            assert max(source.outstanding) <= QUEUE_SIZE, source.outstanding
            assert source.pulls - source.gets == QUEUE_SIZE, (source.pulls, source.gets)
            if taken < TAKES:
                source.got()
                group = actor.get(timeout=60)
                assert group is not None and group.index == taken
    assert max(source.outstanding) <= QUEUE_SIZE, source.outstanding
    assert source.pulls == TAKES + QUEUE_SIZE
    assert not engine.has_unfinished_requests()
    engine.check_invariants()
