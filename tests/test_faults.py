"""Faults: each one finishes only the requests it touches, leaks no page, and the engine keeps
serving (bitwise as a clean engine would) afterwards.

  * a non-finite weight update is refused, whatever the mode, and the old weights keep serving;
  * non-finite logits mid-run (one token's embedding row is NaN / inf: a device fault or an
    overflow the update check cannot see) finish the requests whose prompt holds that token with
    finish_reason='error'; the others finish normally, bitwise equal to a clean engine;
  * a non-finite logprob from finite logits (fp32 overflow in processing) is an 'error' too;
  * abort of an unknown id raises KeyError; of a finished one it is a no-op returning None;
  * an exception raised inside a user `stop` callback finishes only that request with
    finish_reason='error'.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jengine import EngineConfig, Model, SamplingParams, init_params
from jengine.engine import Engine
from tests.conftest import same_bits

CFG = dict(num_pages=12, page_size=4, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32)
# the untied model compiles its own step anyway: one bucket (16 tokens) halves that cost
CFG_UNTIED = {**CFG, "max_num_batched_tokens": 16}
POISON = 77  # the token whose embedding row goes non-finite

CLEAN_PROMPTS = [[3, 4, 5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20], [21, 22]]
POISONED_PROMPTS = [[3, 4, POISON, 6], [POISON, 30, 31, 32, 33, 34, 35, 36, 37]]


def _params(i: int) -> SamplingParams:
    return SamplingParams(
        max_tokens=6 + i % 3, seed=40 + i, temperature=[0.0, 0.8, 1.0][i % 3], ignore_eos=True
    )


@pytest.fixture(scope="module")
def untied():
    """The tiny model with an untied lm_head: a poisoned embedding row then only hurts the
    requests that feed that token (tied, it would also poison every request's logits)."""
    from jengine import ModelConfig

    cfg = ModelConfig.named("tiny").replace(tie_word_embeddings=False)
    return Model(cfg, init_params(cfg, seed=0))


def _drain(engine, limit=1000):
    outs = {}
    for _ in range(limit):
        if not engine.has_unfinished_requests():
            break
        for o in engine.step():
            assert o.request_id not in outs, "finished twice"
            outs[o.request_id] = o
    assert not engine.has_unfinished_requests(), "engine did not drain"
    engine.check_invariants()
    assert engine.schedulers[0].allocator.num_free == engine.num_pages, "pages leaked"
    return outs


def _same(a, b):
    return a.token_ids == b.token_ids and same_bits(a.logprobs, b.logprobs)


_REFERENCE: dict = {}


def _clean_reference(model, cfg=CFG):
    """CLEAN_PROMPTS on a fresh engine that saw no fault (computed once per model)."""
    key = (model.config, id(model.params))
    if key not in _REFERENCE:
        _REFERENCE[key] = Engine(model, EngineConfig(**cfg)).generate(
            CLEAN_PROMPTS, [_params(i) for i in range(len(CLEAN_PROMPTS))]
        )
    return _REFERENCE[key]


def _serves_like_fresh(engine, model, prompt=(40, 41, 42, 43, 44), sp=None):
    """The engine still serves: a new request equals the same one on a fresh engine."""
    sp = sp or SamplingParams(max_tokens=5, seed=9, temperature=0.9)
    got = engine.generate([list(prompt)], sp)[0]
    fresh = Engine(Model(model.config, engine.runner.params), engine.config)
    want = fresh.generate([list(prompt)], sp)[0]
    assert got.finish_reason == "length" and _same(got, want)
    engine.check_invariants()
    assert engine.schedulers[0].allocator.num_free == engine.num_pages


@pytest.mark.parametrize("value", [jnp.nan, -jnp.inf])
@pytest.mark.parametrize("mode", ["keep", "recompute", "abort"])
def test_non_finite_weight_update_is_refused(tiny_model, value, mode):
    engine = Engine(tiny_model, EngineConfig(**CFG))
    ids = [engine.add_request(p, _params(i)) for i, p in enumerate(CLEAN_PROMPTS)]
    engine.step()
    bad = dict(tiny_model.params, embed=tiny_model.params["embed"].at[POISON, 0].set(value))
    with pytest.raises(ValueError, match=r"embed.*non-finite"):
        engine.update_weights(bad, mode=mode)
    assert engine.policy_version == 0 and not engine._undelivered
    outs = _drain(engine)
    ref = _clean_reference(tiny_model)
    for rid, want in zip(ids, ref):
        assert outs[rid].finish_reason == "length" and _same(outs[rid], want)
        assert outs[rid].policy_versions.tolist() == [0] * len(want.token_ids)
    _serves_like_fresh(engine, tiny_model)


@pytest.mark.parametrize("value", [jnp.nan, jnp.inf])
def test_non_finite_logits_finish_only_the_affected_requests(untied, value):
    clean_ref = _clean_reference(untied, CFG_UNTIED)
    assert all(POISON not in o.token_ids for o in clean_ref), "pick another POISON token"
    engine = Engine(untied, EngineConfig(**CFG_UNTIED))
    # a fault the update check cannot see (a device fault, an activation overflow): inject the
    # poisoned params behind the validation, while requests are in flight
    ids = [engine.add_request(p, _params(i)) for i, p in enumerate(CLEAN_PROMPTS)]
    engine.step()
    good = engine.runner.params
    engine.runner.params = dict(good, embed=good["embed"].at[POISON].set(value))
    bad_ids = [engine.add_request(p, _params(10 + i)) for i, p in enumerate(POISONED_PROMPTS)]
    outs = _drain(engine)
    for rid in bad_ids:
        assert outs[rid].finish_reason == "error" and "non-finite" in outs[rid].error
        assert outs[rid].token_ids == []  # its first sample already saw the bad logits
    for rid, want in zip(ids, clean_ref):
        assert outs[rid].finish_reason == "length" and _same(outs[rid], want)
    # the fault stays local to the requests that feed the bad row even after their pages (holding
    # NaN/inf K/V) are reused by others
    more = [engine.add_request(p, _params(i)) for i, p in enumerate(CLEAN_PROMPTS)]
    outs = _drain(engine)
    for rid, want in zip(more, clean_ref):
        assert _same(outs[rid], want)
    engine.runner.params = good  # the fault clears
    _serves_like_fresh(engine, untied)


def test_non_finite_logprob_from_finite_logits_is_an_error(tiny_model):
    engine = Engine(tiny_model, EngineConfig(**CFG))
    ok = engine.add_request(CLEAN_PROMPTS[0], _params(0))
    # a temperature SamplingParams refuses, smuggled past validation: finite logits, NaN logprobs
    sp = SamplingParams(max_tokens=4, seed=3, top_p=0.9)
    object.__setattr__(sp, "temperature", float("nan"))
    bad = engine.add_request(CLEAN_PROMPTS[1], sp)
    outs = _drain(engine)
    assert outs[bad].finish_reason == "error", outs[bad]
    assert np.all(np.isfinite(outs[bad].logprobs))
    assert _same(outs[ok], _clean_reference(tiny_model)[0])
    _serves_like_fresh(engine, tiny_model)


def test_abort_unknown_raises_and_finished_is_a_noop(tiny_model):
    engine = Engine(tiny_model, EngineConfig(**CFG))
    rid = engine.add_request([3, 4, 5], SamplingParams(max_tokens=2, seed=0))
    other = engine.add_request(CLEAN_PROMPTS[0], _params(0))
    with pytest.raises(KeyError, match="never-seen"):
        engine.abort("never-seen")
    outs = {}
    while rid not in outs:
        outs.update({o.request_id: o for o in engine.step()})
    assert engine.abort(rid) is None  # finished: a no-op
    assert engine.abort(rid) is None
    with pytest.raises(KeyError):
        engine.abort("never-seen")
    outs.update(_drain(engine))
    assert outs[rid].finish_reason == "length"
    assert _same(outs[other], _clean_reference(tiny_model)[0])
    # abort of a request finished by an abort-mode update but not yet returned by step()
    late = engine.add_request(CLEAN_PROMPTS[1], _params(1))
    engine.step()
    engine.update_weights(tiny_model.params, mode="abort")
    assert engine.abort(late) is None
    delivered = engine.step()
    assert [o.request_id for o in delivered] == [late] and delivered[0].finish_reason == "aborted"
    _serves_like_fresh(engine, tiny_model)


@pytest.mark.parametrize("exc", [RuntimeError("boom"), ValueError("bad"), ZeroDivisionError()])
@pytest.mark.parametrize("after", [1, 3])
def test_stop_callback_exception_finishes_only_that_request(tiny_model, exc, after):
    engine = Engine(tiny_model, EngineConfig(**CFG))
    calls = []

    def stop(tokens):
        calls.append(list(tokens))
        if len(tokens) >= after:
            raise exc
        return False

    ids = [engine.add_request(p, _params(i)) for i, p in enumerate(CLEAN_PROMPTS)]
    bad = engine.add_request([50, 51, 52, 53, 54, 55, 56], _params(5), stop=stop)
    fine_cb = engine.add_request(CLEAN_PROMPTS[2], _params(2), stop=lambda toks: False)
    outs = _drain(engine)
    assert outs[bad].finish_reason == "error"
    assert type(exc).__name__ in outs[bad].error
    assert len(outs[bad].token_ids) == after and len(calls) == after
    assert np.all(np.isfinite(outs[bad].logprobs))
    ref = _clean_reference(tiny_model)
    for rid, want in zip(ids, ref):
        assert outs[rid].finish_reason == "length" and _same(outs[rid], want)
    assert _same(outs[fine_cb], ref[2])
    _serves_like_fresh(engine, tiny_model)


def test_stop_callback_returning_garbage_is_an_error_not_a_crash(tiny_model):
    engine = Engine(tiny_model, EngineConfig(**CFG))
    ok = engine.add_request(CLEAN_PROMPTS[0], _params(0))
    bad = engine.add_request([3, 4], _params(1), stop=lambda toks: np.array([True, False]))
    outs = _drain(engine)
    assert outs[bad].finish_reason == "error" and len(outs[bad].token_ids) == 1
    assert _same(outs[ok], _clean_reference(tiny_model)[0])
