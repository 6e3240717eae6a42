"""`rl.RolloutActor`: a background thread owns the engine and hands finished groups to the trainer.

What is proved here (tiny random model):
  * every group of the source is delivered exactly once, and without weight updates its outputs
    are bitwise a plain `engine.generate` of the same requests;
  * published updates reach the engine between steps: versions (in the trainer's numbering, with
    skipped updates) never fall within a sequence nor across groups, and a group's
    `min_version` / `on_policy` say which params computed it; an on-policy group's logprobs are
    `jengine.score`'s bits under that version's params;
  * `close()` with groups in flight and an endless source stops the thread and leaves the engine
    empty with balanced page books;
  * an exception on the actor thread (in the source or in the engine) surfaces in `get()`, or in
    `close()` when nobody called `get()`.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading

import jax
import numpy as np
import pytest

import jengine
from jengine import Engine, EngineConfig, SamplingParams, rl
from tests.conftest import random_prompts, same_bits

CONFIG = EngineConfig(max_model_len=64, max_num_seqs=8, max_num_batched_tokens=64)
G = 3


def _requests(n: int, seed: int = 0, max_tokens: int = 5) -> list[rl.GroupRequest]:
    prompts = random_prompts(n, 512, lo=3, hi=20, seed=seed)
    return [
        rl.GroupRequest(
            p,
            [
                SamplingParams(temperature=0.9, max_tokens=max_tokens, seed=(seed + k) * G + i)
                for i in range(G)
            ],
            meta=k,
        )
        for k, p in enumerate(prompts)
    ]


def _scaled(params, factor):
    return jax.tree_util.tree_map(lambda x: x * factor, params)


def test_every_group_delivered_once_and_equal_to_generate(tiny_model):
    reqs = _requests(7, seed=1)
    engine = Engine(tiny_model, CONFIG)
    with rl.RolloutActor(engine, reqs, max_in_flight=2, queue_size=2) as actor:
        groups = []
        while (g := actor.get(timeout=120)) is not None:
            groups.append(g)
        assert actor.get() is None  # stays exhausted
    assert sorted(g.index for g in groups) == list(range(7))
    assert not engine.has_unfinished_requests()
    engine.check_invariants()
    ref = Engine(tiny_model, CONFIG).generate(
        [r.prompt for r in reqs for _ in range(G)], [sp for r in reqs for sp in r.sampling_params]
    )
    for g in groups:
        assert g.request is reqs[g.index] and g.submitted_version == 0 and g.on_policy(0)
        for i, out in enumerate(g.outputs):
            want = ref[g.index * G + i]
            assert out.token_ids == want.token_ids
            assert same_bits(out.logprobs, want.logprobs)
            assert (g.versions[i] == 0).all()


def test_versions_rise_lag_is_measured_and_on_policy_groups_are_exact(tiny_model):
    reqs = _requests(12, seed=2, max_tokens=8)
    engine = Engine(tiny_model, CONFIG)
    params = {0: tiny_model.params}
    groups = []
    with rl.RolloutActor(engine, reqs, max_in_flight=2, queue_size=1) as actor:
        for k in range(12):
            groups.append(actor.get(timeout=120))
            if k % 3 == 2:  # trainer versions 10, 20, 30, 40: not the engine's own numbering
                v = 10 * (k // 3 + 1)
                params[v] = _scaled(tiny_model.params, 1.0 + 0.01 * v)
                actor.publish(params[v], version=v)
        assert actor.get(timeout=120) is None
        with pytest.raises(ValueError, match="version=5 must exceed"):
            actor.publish(tiny_model.params, version=5)
    seen = set()
    for g in groups:
        assert g.min_version <= max(int(v.max()) for v in g.versions)
        for v in g.versions:
            assert set(v.tolist()) <= set(params) and (np.diff(v) >= 0).all()
            seen |= set(v.tolist())
        # every token's version is no older than the group's submission
        assert all((v >= g.submitted_version).all() for v in g.versions)
    assert seen - {0}, "no update reached the engine"
    mins = [g.min_version for g in sorted(groups, key=lambda g: g.index)]
    assert mins == sorted(mins)  # admitted in order, versions never fall
    on_policy = [g for g in groups if g.on_policy(g.submitted_version)]
    assert on_policy
    for g in on_policy:
        model = jengine.Model(tiny_model.config, params[g.submitted_version])
        scored = jengine.score(
            model,
            [g.request.prompt] * G,
            [o.token_ids for o in g.outputs],
            list(g.request.sampling_params),
            numerics=engine.numerics,
        )
        for s, o in zip(scored, g.outputs):
            assert same_bits(s, o.logprobs)
    assert actor.stats["updates"] + actor.stats["skipped_updates"] == 4


def test_close_with_groups_in_flight_is_clean(tiny_model):
    # the first group is one token long, the others 40: they are mid-generation at close()
    lengths = itertools.chain([1], itertools.repeat(40))
    source = (r for k, n in enumerate(lengths) for r in _requests(1, seed=100 + k, max_tokens=n))
    engine = Engine(tiny_model, CONFIG)
    actor = rl.RolloutActor(engine, source, max_in_flight=3, queue_size=4).start()
    assert actor.get(timeout=120) is not None
    actor.publish(_scaled(tiny_model.params, 1.01), version=1)
    actor.close()
    assert actor.stats["aborted"] > 0  # requests were in flight at close()
    assert not actor._thread.is_alive()
    assert not engine.has_unfinished_requests()
    engine.check_invariants()
    with pytest.raises(RuntimeError, match="closed"):
        actor.get(timeout=1)


def test_an_exception_in_the_source_surfaces_in_get(tiny_model):
    def source():
        yield from _requests(2, seed=3)
        raise KeyError("source broke")

    with rl.RolloutActor(Engine(tiny_model, CONFIG), source(), max_in_flight=1) as actor:
        got = []
        with pytest.raises(KeyError, match="source broke"):
            while True:
                got.append(actor.get(timeout=120))
        assert len(got) <= 2


def test_an_exception_in_the_engine_surfaces_in_get_and_close(tiny_model):
    bad = [rl.GroupRequest([1, 2, 10**6], [SamplingParams(max_tokens=2)])]  # token id > vocab
    with rl.RolloutActor(Engine(tiny_model, CONFIG), bad) as actor:
        with pytest.raises(ValueError, match="token id 1000000"):
            actor.get(timeout=120)
    actor = rl.RolloutActor(Engine(tiny_model, CONFIG), bad).start()
    actor._thread.join(60)
    with pytest.raises(ValueError, match="token id 1000000"):
        actor.close()  # never delivered by get(): close() raises it


def test_get_times_out_and_bad_sizes_are_refused(tiny_model):
    engine = Engine(tiny_model, CONFIG)
    with pytest.raises(ValueError, match="max_in_flight=0"):
        rl.RolloutActor(engine, [], max_in_flight=0)
    release = threading.Event()

    def waiting_source():
        release.wait(60)  # the actor thread blocks here: nothing is generated meanwhile
        yield from ()

    with rl.RolloutActor(engine, waiting_source()) as actor:
        with pytest.raises(queue.Empty):
            actor.get(timeout=0.2)
        release.set()
        assert actor.get(timeout=30) is None


def test_groups_of_trajectories_equal_multi_turn_and_close_cleanly(tiny_model):
    """A request with an env is a group of trajectories: delivered once each, bitwise the
    trajectories `rl.multi_turn` gives on a fresh engine, versions covering the model tokens; a
    close() with trajectories in flight leaves the engine empty."""

    def env(traj):  # two environment turns of 3 ids, then the end
        return [7 + traj.tokens[-1] % 5, 8, 9] if len(traj.model_turns) < 3 else None

    async def slow_env(traj):
        return env(traj)

    reqs = [dataclasses.replace(r, env=slow_env if k % 2 else env)
            for k, r in enumerate(_requests(4, seed=4))]  # fmt: skip
    engine = Engine(tiny_model, CONFIG)
    with rl.RolloutActor(engine, reqs, max_in_flight=2, queue_size=2, max_turns=3) as actor:
        groups = sorted(iter(lambda: actor.get(timeout=120), None), key=lambda g: g.index)
    assert [g.index for g in groups] == [0, 1, 2, 3] and not engine.has_unfinished_requests()
    for g, r in zip(groups, reqs):
        want = rl.multi_turn(Engine(tiny_model, CONFIG), r.env, [r.prompt] * G,
                             r.sampling_params, max_turns=3)  # fmt: skip
        for got, w, v in zip(g.outputs, want, g.versions):
            assert got.status == w.status == "max_turns" and got.tokens == w.tokens
            assert same_bits(got.logprobs, w.logprobs) and v.shape == (got.num_model_tokens,)
    endless = (dataclasses.replace(r, env=env) for r in itertools.cycle(_requests(2, seed=5)))
    actor = rl.RolloutActor(engine, endless, max_in_flight=2, queue_size=4).start()
    assert actor.get(timeout=120) is not None
    actor.close()
    assert not engine.has_unfinished_requests() and actor.stats["aborted"] > 0
    engine.check_invariants()
