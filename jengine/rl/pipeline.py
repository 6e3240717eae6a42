"""A rollout actor for pipelined RL (PipelineRL's loop shape): generation never waits for training.

    actor = RolloutActor(engine, source, max_in_flight=8, queue_size=8)
    with actor:                                   # starts the thread; close() on exit
        for step in range(steps):
            groups = [actor.get() for _ in range(8)]   # finished GRPO groups, oldest first
            params = train(params, groups)             # per-token versions: group.versions
            actor.publish(params, version=step + 1)    # reaches the engine between two steps

One background thread owns the `Engine`: after `start()` only that thread calls it, until `close()`
returns. It pulls `GroupRequest`s from `source` (any iterator, read on the actor thread), keeps at
most `max_in_flight` groups in the engine and puts each finished `Group` on a bounded queue. A new
group is admitted only while fewer than `queue_size` groups are in flight or finished but not yet
taken by `get()`: the bound on policy lag (a trainer taking N groups per update with
queue_size = N sees lag <= 1 when generation keeps up). Between two engine steps the actor applies
the newest published params (a latest-value mailbox: a superseded update is skipped) with
`engine.update_weights(params, mode=update_mode)`.

Versions are the trainer's: `publish(params, version)` names the version, and
`Group.versions[i][t]` is the trainer version that produced token t of sample i (the engine's own
counter is in `outputs[i].policy_versions`). A group whose `submitted_version` (served when it
entered the engine) and token versions all equal v was computed entirely under v's params, so
under v its rollout logprobs are the trainer's bits exactly.

A `GroupRequest` with an `env` is a group of multi-turn trajectories (`rl.multi_turn`'s loop, as
`self.multi_turn`: `max_turns` and `max_tokens` are its limits): the actor calls the environment
between engine steps and delivers the group when every trajectory has ended; `Group.versions[i]`
then covers the trajectory's model tokens.

`close()` stops the thread: in-flight requests are aborted (the engine is left empty, no pages
held) and the thread is joined with a timeout. An exception on the actor thread is re-raised in
the trainer by the next `get()` (or by `close()` if never delivered). Published params must not
be donated or mutated by the trainer afterwards.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from jengine.config import SamplingParams
from jengine.engine import Engine, RequestOutput
from jengine.rl.multi_turn import MultiTurn
from jengine.rl.trajectory import Trajectory

_END = object()  # queue marker: the source is exhausted and every group was delivered


@dataclasses.dataclass(frozen=True)
class GroupRequest:
    """One prompt sampled G = len(sampling_params) times; `meta` rides along (e.g. the answer).
    With an `env` (an environment as `rl.multi_turn` takes), each sample is a multi-turn
    `rl.Trajectory` instead of one request."""

    prompt: Sequence[int]
    sampling_params: Sequence[SamplingParams]
    meta: Any = None
    env: Callable | None = None


@dataclasses.dataclass
class Group:
    """A finished group: `outputs[i]` answers `request.sampling_params[i]` (a `RequestOutput`, or
    an `rl.Trajectory` when the request has an env); `versions[i]` is i32 trainer versions of its
    sampled tokens (`token_ids`, or the trajectory's model tokens in order); `index` is the
    request's place in the source."""

    index: int
    request: GroupRequest
    outputs: list[RequestOutput | Trajectory]
    versions: list[np.ndarray]
    submitted_version: int

    @property
    def min_version(self) -> int:
        """Oldest version that computed anything of this group (its prompt KV included)."""
        return min([self.submitted_version] + [int(v.min()) for v in self.versions if v.size])

    def on_policy(self, version: int) -> bool:
        """Every token and every KV entry of the group was computed under `version`."""
        return self.submitted_version == version and all(
            (v == version).all() for v in self.versions)  # fmt: skip


class RolloutActor:
    """A background thread that owns `engine` and turns `source` into finished `Group`s."""

    def __init__(self, engine: Engine, source: Iterable[GroupRequest], *, max_in_flight: int = 8,
                 queue_size: int = 8, update_mode: str = "keep", version: int = 0,
                 join_timeout: float = 120.0, max_turns: int = 8,
                 max_tokens: int | None = None):  # fmt: skip
        if max_in_flight < 1 or queue_size < 1:
            raise ValueError(f"max_in_flight={max_in_flight} and queue_size={queue_size} must "
                             "be >= 1")  # fmt: skip
        self.engine, self._source = engine, iter(source)
        self.max_in_flight, self.update_mode = max_in_flight, update_mode
        self.join_timeout = join_timeout
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._mailbox: tuple[Any, int] | None = None
        self._published = self.version = version  # trainer version the engine serves
        self._version_of = {engine.policy_version: version}  # engine version -> trainer version
        self._error: BaseException | None = None
        self._error_seen = self._ended = self._closed = False
        # groups, updates, skipped_updates, steps, idle_seconds, aborted
        self.stats: collections.Counter = collections.Counter()
        self.engine_stats: dict[str, Any] = dict(engine.stats)  # copied after every engine step
        # requests with an env: their trajectories (max_turns, max_tokens: as rl.multi_turn's)
        self.multi_turn = MultiTurn(engine, max_turns=max_turns, max_tokens=max_tokens)
        self._thread = threading.Thread(target=self._run, name="rollout-actor", daemon=True)

    # -- trainer side ---------------------------------------------------------------------------

    def start(self) -> RolloutActor:
        self._thread.start()
        return self

    def publish(self, params: Any, version: int) -> None:
        """Hands new params (trainer version `version`, > every earlier one) to the actor."""
        with self._lock:
            if version <= self._published:
                raise ValueError(f"version={version} must exceed the last published "
                                 f"{self._published}")  # fmt: skip
            if self._mailbox is not None:
                self.stats["skipped_updates"] += 1
            self._mailbox, self._published = (params, version), version

    def get(self, timeout: float | None = None) -> Group | None:
        """The next finished group; None once the source is exhausted and all were delivered.
        Raises the actor's exception if it failed, queue.Empty after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._closed:
                raise RuntimeError("get() on a closed rollout actor")
            if self._ended:
                return None
            try:
                item = self._queue.get(timeout=0.05)
            except queue.Empty:
                if self._error is not None:
                    self._error_seen = True
                    raise self._error
                if not self._thread.is_alive():
                    raise RuntimeError("the rollout actor is not running: start() it")
                if deadline is not None and time.monotonic() > deadline:
                    raise
                continue
            if item is _END:
                self._ended = True
                return None
            return item

    def close(self) -> None:
        """Stops the thread (in-flight requests aborted) and joins it; raises TimeoutError if it
        does not stop within `join_timeout`, or the actor's exception if no `get` delivered it."""
        self._stop.set()
        self._closed = True
        if self._thread.is_alive():
            self._thread.join(self.join_timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"rollout actor did not stop within {self.join_timeout} s")
        if self._error is not None and not self._error_seen:
            self._error_seen = True
            raise self._error

    def __enter__(self) -> RolloutActor:
        return self.start()

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is not None:  # the body's exception wins; still stop the thread
            self._error_seen = True
        self.close()

    # -- actor thread -------------------------------------------------------------------------

    def _apply_update(self) -> None:
        with self._lock:
            item, self._mailbox = self._mailbox, None
        if item is not None:
            self._version_of[self.engine.update_weights(item[0], mode=self.update_mode)] = item[1]
            self.version = item[1]
            self.stats["updates"] += 1

    def _run(self) -> None:
        building: dict[int, dict] = {}  # group index -> {request, outputs, submitted}
        owner: dict[str, tuple[int, int]] = {}  # request id -> (group index, sample index)
        owner_of_trajectory: dict[int, tuple[int, int]] = {}  # trajectory index -> the same
        ready: collections.deque[Group] = collections.deque()
        index, exhausted = 0, False

        def deliver(g: int, i: int, out: RequestOutput | Trajectory) -> None:
            (b := building[g])["outputs"][i] = out
            if len(b["outputs"]) == len(b["request"].sampling_params):
                ready.append(self._group(g, building.pop(g)))

        try:
            while not self._stop.is_set():
                self._apply_update()
                while (not exhausted and len(building) < self.max_in_flight
                       and self._room(building, ready)):  # fmt: skip
                    req = next(self._source, None)
                    if req is None:
                        exhausted = True
                        break
                    building[index] = dict(request=req, outputs={}, submitted=self.version)
                    for i, sp in enumerate(req.sampling_params):
                        if req.env is None:
                            owner[self.engine.add_request(req.prompt, sp)] = (index, i)
                        else:
                            traj = self.multi_turn.add(req.prompt, req.env, sp, req.meta)
                            owner_of_trajectory[traj.index] = (index, i)
                    index += 1
                while ready:  # hand over what is finished, without blocking
                    try:
                        self._queue.put_nowait(ready[0])
                    except queue.Full:
                        break
                    ready.popleft()
                    self.stats["groups"] += 1
                for traj in self.multi_turn.poll():  # async environments that answered
                    deliver(*owner_of_trajectory.pop(traj.index), traj)
                if self.engine.has_unfinished_requests():
                    for out in self.engine.step():
                        if out.request_id in owner:
                            deliver(*owner.pop(out.request_id), out)
                        elif (traj := self.multi_turn.handle(out)) is not None:
                            deliver(*owner_of_trajectory.pop(traj.index), traj)
                    self.stats["steps"] += 1
                    self.engine_stats = dict(self.engine.stats)
                elif exhausted and not ready and not building:
                    while not self._stop.is_set():
                        try:
                            self._queue.put(_END, timeout=0.05)
                            return
                        except queue.Full:
                            self._apply_update()
                else:  # queue full and nothing to run: wait for the trainer
                    t0 = time.perf_counter()
                    self._stop.wait(0.005)
                    self.stats["idle_seconds"] += time.perf_counter() - t0
        except BaseException as e:  # re-raised in the trainer by get() / close()
            self._error = e
        finally:
            self.stats["aborted"] += len(self.multi_turn.abort())
            self.multi_turn.close()
            for rid in list(owner):  # leave the engine empty: nothing in flight, no pages held
                try:
                    self.engine.abort(rid)
                    self.stats["aborted"] += 1
                except Exception:  # noqa: BLE001 -- already finished or engine broken
                    pass

    def _room(self, building: dict, ready: collections.deque) -> bool:
        """Fewer than queue_size groups are generated and not yet taken by the trainer."""
        return len(building) + len(ready) + self._queue.qsize() < self._queue.maxsize

    def _group(self, index: int, b: dict) -> Group:
        outs = [b["outputs"][i] for i in range(len(b["request"].sampling_params))]
        lookup = np.vectorize(self._version_of.__getitem__, otypes=[np.int32])
        engine_versions = [o.policy_versions[o.loss_mask] if isinstance(o, Trajectory)
                           else o.policy_versions for o in outs]  # fmt: skip
        versions = [lookup(v) if v.size else np.zeros(0, np.int32) for v in engine_versions]
        return Group(index, b["request"], outs, versions, b["submitted"])
