"""In-flight weight updates: `Engine.update_weights(params, mode)` with keep / recompute / abort.

What is proved here:
  * recompute: tokens sampled before the update are bitwise `score(old model)` on their prefix,
    tokens after it bitwise `score(new model)` on the full prefix (split by policy_versions);
  * keep: versions switch 0 -> 1 exactly where the update happened, and the update frees or
    reallocates no page (allocator books and every sequence's pages are unchanged);
  * abort: every in-flight request ends 'aborted', delivered by the next step();
  * a malformed update (wrong shape, dtype, missing leaf, NaN) is refused with an error naming the
    leaf, nothing changes, and later outputs equal a fresh engine's;
  * after an update in any mode, a request sharing a cached prefix with earlier ones gives
    output bitwise equal to a fresh engine holding the new weights.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jengine
from jengine import EngineConfig, Model, SamplingParams, init_params
from jengine.engine import Engine
from tests.conftest import random_prompts, same_bits

# The same engine shape as tests/test_engine.py (shares its compiled steps in one pytest run).
BASE = dict(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64)
PARAMS = [
    SamplingParams(temperature=1.0, max_tokens=10, seed=11, ignore_eos=True),
    SamplingParams(temperature=0.7, top_k=40, max_tokens=10, seed=12, ignore_eos=True),
    SamplingParams(
        temperature=0.9, top_p=0.85, min_p=0.02, max_tokens=10, seed=13, ignore_eos=True
    ),
]


@pytest.fixture(scope="module")
def new_model(tiny_model):
    return Model(tiny_model.config, init_params(tiny_model.config, seed=1))


def _engine(model, **cfg):
    return Engine(model, EngineConfig(**{**BASE, **cfg}))


def _drain(engine):
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    return {o.request_id: o for o in outs}


def _start(engine, prompts, params, steps):
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    for _ in range(steps):
        engine.step()
    generated = {rid: engine._seqs[rid].num_generated for rid in ids}
    return ids, generated


def test_recompute_is_old_score_before_and_new_score_after(tiny_model, new_model):
    prompts = random_prompts(3, 512, lo=5, hi=30, seed=21)
    engine = _engine(tiny_model)
    ids, before = _start(engine, prompts, PARAMS, steps=4)
    assert all(0 < k < 10 for k in before.values()), before
    preemptions = engine.stats["preemptions"]
    assert engine.update_weights(new_model.params, mode="recompute") == 1
    assert all(not engine._seqs[rid].pages for rid in ids)  # KV dropped, to be recomputed
    outs = _drain(engine)
    assert engine.stats["preemptions"] == preemptions  # a recompute is not a preemption
    engine.check_invariants()
    outs = [outs[rid] for rid in ids]
    ks = [before[rid] for rid in ids]
    for out, k in zip(outs, ks):
        assert out.finish_reason == "length" and len(out.token_ids) == 10
        assert out.policy_versions.tolist() == [0] * k + [1] * (10 - k)
    # one batched score call per model (score is batch-invariant; fewer compilations)
    old = jengine.score(tiny_model, prompts, [o.token_ids[:k] for o, k in zip(outs, ks)], PARAMS)
    new = jengine.score(new_model, prompts, [o.token_ids for o in outs], PARAMS)
    stale = jengine.score(tiny_model, prompts, [o.token_ids for o in outs], PARAMS)
    for out, k, o, n, st in zip(outs, ks, old, new, stale):
        assert same_bits(o, out.logprobs[:k])
        assert same_bits(n[k:], out.logprobs[k:])
        assert not same_bits(st[k:], out.logprobs[k:])  # the old model would not give these


def _allocator_state(engine):
    a = engine.schedulers[0].allocator
    return (list(a.refcount), a.num_free, list(a._is_free), dict(a._cached), dict(a._key_of))


def test_keep_switches_versions_in_place_and_touches_no_page(tiny_model, new_model):
    prompts = random_prompts(3, 512, lo=5, hi=30, seed=21)  # the recompute test's requests
    engine = _engine(tiny_model)
    ids, before = _start(engine, prompts, PARAMS, steps=4)
    pages = {rid: list(engine._seqs[rid].pages) for rid in ids}
    computed = {rid: engine._seqs[rid].num_computed for rid in ids}
    state = _allocator_state(engine)
    engine.pause()
    assert engine.step() == []  # paused: nothing runs
    assert engine.update_weights(new_model.params, mode="keep") == 1
    assert _allocator_state(engine) == state
    assert {rid: engine._seqs[rid].pages for rid in ids} == pages
    assert {rid: engine._seqs[rid].num_computed for rid in ids} == computed
    engine.resume()
    outs = _drain(engine)
    engine.check_invariants()
    outs = [outs[rid] for rid in ids]
    ks = [before[rid] for rid in ids]
    old = jengine.score(tiny_model, prompts, [o.token_ids[:k] for o, k in zip(outs, ks)], PARAMS)
    for out, k, o in zip(outs, ks, old):
        assert 0 < k < 10
        assert out.policy_versions.tolist() == [0] * k + [1] * (10 - k)
        assert same_bits(o, out.logprobs[:k])
        assert np.all(np.isfinite(out.logprobs))


def test_abort_ends_in_flight_requests_on_the_next_step(tiny_model, new_model):
    prompts = random_prompts(10, 512, lo=20, hi=30, seed=23)  # > 2 steps of 64-token budget
    params = [PARAMS[i % 3] for i in range(10)]
    engine = _engine(tiny_model)
    ids, before = _start(engine, prompts, params, steps=2)
    assert engine.schedulers[0].waiting and min(before.values()) == 0 < max(before.values())
    assert engine.update_weights(new_model.params, mode="abort") == 1
    assert engine.schedulers[0].allocator.num_free == engine.num_pages
    outs = engine.step()
    assert sorted(o.request_id for o in outs) == sorted(ids)  # waiting ones too
    for o in outs:
        assert o.finish_reason == "aborted"
        assert len(o.token_ids) == before[o.request_id]
        assert (o.policy_versions == 0).all()
    assert not engine.has_unfinished_requests()
    # the engine serves the new weights afterwards
    after = engine.generate(prompts[:1], PARAMS[:1])[0]
    fresh = _engine(new_model).generate(prompts[:1], PARAMS[:1])[0]
    assert (after.policy_versions == 1).all()
    assert after.token_ids == fresh.token_ids and same_bits(after.logprobs, fresh.logprobs)


def _bad_updates(params):
    def copy():
        return jax.tree_util.tree_map(lambda x: x, params)

    wrong_shape = copy()
    wrong_shape["layers"]["w_up"] = wrong_shape["layers"]["w_up"][..., :-1]
    wrong_dtype = copy()
    wrong_dtype["layers"]["wk"] = wrong_dtype["layers"]["wk"].astype(jnp.bfloat16)
    missing = copy()
    del missing["layers"]["wq"]
    nan = copy()
    nan["final_norm"] = nan["final_norm"].at[3].set(jnp.nan)
    return [
        ("shape", wrong_shape, "['layers']['w_up']"),
        ("dtype", wrong_dtype, "['layers']['wk']"),
        ("missing", missing, "['layers']['wq']"),
        ("nan", nan, "['final_norm']"),
    ]


@pytest.mark.parametrize("kind", ["shape", "dtype", "missing", "nan"])
def test_malformed_update_is_refused_and_changes_nothing(tiny_model, new_model, kind):
    prompts = random_prompts(3, 512, lo=5, hi=30, seed=24)
    engine = _engine(tiny_model)
    ids, _ = _start(engine, prompts, PARAMS, steps=2)
    ((_, bad, leaf),) = [b for b in _bad_updates(new_model.params) if b[0] == kind]
    with pytest.raises(ValueError, match=re.escape(leaf)):
        engine.update_weights(bad, mode="recompute")
    assert engine.policy_version == 0
    outs = _drain(engine)
    fresh = _engine(tiny_model).generate(prompts, PARAMS)
    for rid, f in zip(ids, fresh):
        assert outs[rid].token_ids == f.token_ids
        assert same_bits(outs[rid].logprobs, f.logprobs)
        assert (outs[rid].policy_versions == 0).all()


def test_unknown_mode_is_refused(tiny_model, new_model):
    engine = _engine(tiny_model)
    with pytest.raises(ValueError, match="mode"):
        engine.update_weights(new_model.params, mode="later")
    assert engine.policy_version == 0


@pytest.mark.parametrize("mode", ["keep", "recompute", "abort"])
def test_prefix_shared_after_update_equals_a_fresh_engine(tiny_model, new_model, mode):
    prefix = random_prompts(1, 512, lo=32, hi=33, seed=25)[0]
    group = [prefix + [7 + i, 9] for i in range(4)]  # a GRPO-style group: shared 32-token prefix
    params = [SamplingParams(max_tokens=6, seed=30 + i, ignore_eos=True) for i in range(4)]
    engine = _engine(tiny_model)  # page_size 16: the prefix is two full pages
    engine.generate(group[:2], params[:2])  # registers the prefix pages under version 0
    _start(engine, group[2:3], params[2:3], steps=2)  # in flight at the update
    engine.update_weights(new_model.params, mode=mode)
    later = [prefix + [40, 41, 42], group[3]]
    later_params = [SamplingParams(max_tokens=6, seed=50, ignore_eos=True), params[3]]
    hits = engine.stats["prefix_cache_hit_tokens"]
    outs = engine.generate(later[:1], later_params[:1])
    # Nothing computed under v0 is reused. Under recompute the in-flight sequence re-prefills the
    # prefix under v1 in the same step, and later[0] waits one step to read those v1 pages.
    assert engine.stats["prefix_cache_hit_tokens"] - hits == (32 if mode == "recompute" else 0)
    outs += engine.generate(later[1:], later_params[1:])
    assert engine.stats["prefix_cache_hit_tokens"] - hits >= 32  # pages computed under v1 are
    engine.check_invariants()
    fresh = _engine(new_model).generate(later, later_params)
    for a, b in zip(outs, fresh):
        assert a.token_ids == b.token_ids and same_bits(a.logprobs, b.logprobs)
        assert (a.policy_versions == 1).all()
    _drain(engine)
    engine.check_invariants()
