"""The engine's promises: rollout logprobs are bitwise `jengine.score`, and a request's output does
not depend on its batch, the step budget, page size/placement, arrival order, prefix caching or
preemption."""

import dataclasses

import numpy as np
import pytest

import jengine
from jengine import EngineConfig, Model, SamplingParams
from jengine.engine import Engine
from tests.conftest import random_prompts, same_bits

PARAMS = [
    SamplingParams(temperature=1.0, max_tokens=10, seed=1),
    SamplingParams(temperature=0.7, top_k=40, max_tokens=10, seed=2),
    SamplingParams(temperature=0.9, top_p=0.85, max_tokens=10, seed=3),
    SamplingParams(temperature=1.1, min_p=0.05, max_tokens=10, seed=4),
    SamplingParams(temperature=0.6, top_k=30, top_p=0.9, min_p=0.02, max_tokens=10, seed=5),
    SamplingParams(temperature=0.0, max_tokens=10, seed=6),
]
BASE = dict(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64)


def run(model, prompts, params, **cfg):
    engine = Engine(model, EngineConfig(**{**BASE, **cfg}))
    outs = engine.generate(prompts, params)
    engine.check_invariants()
    assert engine.stats["num_pages_free"] == engine.stats["num_pages"], "pages leaked"
    return outs, engine


def assert_same(a, b):
    assert a.token_ids == b.token_ids
    assert same_bits(a.logprobs, b.logprobs)


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_model_bf16"])
def test_rollout_logprobs_are_bitwise_score(fixture, request):
    model = request.getfixturevalue(fixture)
    prompts = random_prompts(len(PARAMS), model.config.vocab_size, seed=1)
    outs, _ = run(model, prompts, PARAMS)
    for out, prompt, sp in zip(outs, prompts, PARAMS):
        scored = jengine.score(model, prompt, out.token_ids, sp)
        assert same_bits(scored, out.logprobs), (sp, scored, out.logprobs)
        assert np.all(np.isfinite(out.logprobs))


@pytest.mark.parametrize("mode", ["raw_logprobs", "processed_logits", "raw_logits"])
def test_each_logprobs_mode_matches_score(tiny_model, mode):
    prompts = random_prompts(3, tiny_model.config.vocab_size, seed=2)
    outs, _ = run(tiny_model, prompts, PARAMS[:3], logprobs_mode=mode)
    for out, prompt, sp in zip(outs, prompts, PARAMS):
        assert same_bits(jengine.score(tiny_model, prompt, out.token_ids, sp, logprobs_mode=mode), out.logprobs)


@pytest.mark.parametrize(
    "fixture, head", [("tiny_model", "bfloat16"), ("tiny_model_bf16", "model"), ("tiny_model_bf16", "float32")]
)
def test_lm_head_dtype_matches_score(fixture, head, request):
    """Each head dtype is its own numerics (the rollout differs from the default head's) and
    score with the engine's numerics reproduces it; 'model' on a bf16 model is a bf16 head."""
    model = request.getfixturevalue(fixture)
    prompts = random_prompts(2, model.config.vocab_size, seed=3)
    params = [dataclasses.replace(p, temperature=0.0) for p in PARAMS[:2]]  # same tokens
    outs, engine = run(model, prompts, params, lm_head_dtype=head)
    default = "float32" if head != "float32" else "bfloat16"
    others, _ = run(model, prompts, params, lm_head_dtype=default)
    for out, other, prompt, sp in zip(outs, others, prompts, params):
        assert same_bits(jengine.score(model, prompt, out.token_ids, sp, numerics=engine.numerics), out.logprobs)
        if out.token_ids == other.token_ids:
            assert not same_bits(out.logprobs, other.logprobs), "the head dtype changed nothing"


@pytest.fixture(scope="module")
def workload():
    prompts = random_prompts(10, 512, lo=2, hi=70, seed=7)
    shared = random_prompts(1, 512, lo=130, hi=131, seed=8)[0]  # >= 2 full pages at page_size 64
    prompts[1] = shared + prompts[1][:3]  # later arrivals share its pages: cache hits
    prompts[3] = shared[:128] + prompts[3][:40]
    prompts[7] = shared[:72] + prompts[7][:5]
    params = [PARAMS[i % len(PARAMS)] for i in range(10)]
    params = [SamplingParams(**{**p.__dict__, "seed": 100 + i, "max_tokens": 8 + i % 5}) for i, p in enumerate(params)]
    return prompts, params


@pytest.fixture(scope="module")
def alone(tiny_model, workload):
    prompts, params = workload
    return [run(tiny_model, [p], [sp], max_num_seqs=1, max_num_batched_tokens=16)[0][0] for p, sp in zip(prompts, params)]


@pytest.mark.parametrize(
    "cfg",
    [
        dict(),
        dict(max_num_seqs=3, max_num_batched_tokens=16),  # small chunks, few seats
        dict(max_num_seqs=16, max_num_batched_tokens=256),  # one big batch
        dict(page_size=4),
        dict(page_size=64),
        dict(enable_prefix_caching=False),
        dict(min_token_bucket=2),  # steps of 1-15 tokens in 2-, 4- and 8-row tiles
        dict(min_token_bucket=2, max_num_seqs=3, max_num_batched_tokens=16, page_size=4),
    ],
    ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default",
)
def test_output_independent_of_batching(tiny_model, workload, alone, cfg):
    prompts, params = workload
    outs, engine = run(tiny_model, prompts, params, **cfg)
    for a, b in zip(alone, outs):
        assert_same(a, b)
    hits = engine.stats["prefix_cache_hit_tokens"]
    assert (hits == 0) if cfg.get("enable_prefix_caching") is False else (hits > 0), hits
    if "min_token_bucket" in cfg:  # steps ran below the default smallest bucket
        assert {t for t, _, _ in engine.runner.compiled} & {2, 4, 8}, engine.runner.compiled


def test_output_independent_of_arrival_order(tiny_model, workload, alone):
    prompts, params = workload
    order = np.random.default_rng(0).permutation(len(prompts))
    outs, _ = run(tiny_model, [prompts[i] for i in order], [params[i] for i in order])
    for j, i in enumerate(order):
        assert_same(alone[i], outs[j])


def test_preemption_under_a_tiny_pool_changes_nothing(tiny_model, workload, alone):
    prompts, params = workload
    outs, engine = run(tiny_model, prompts, params, num_pages=24, page_size=8, max_num_seqs=8)
    assert engine.stats["preemptions"] > 0
    for a, b in zip(alone, outs):
        assert_same(a, b)


def test_prefix_cache_hits_change_nothing(tiny_model):
    prefix = random_prompts(1, 512, lo=40, hi=41, seed=9)[0]
    prompts = [prefix + [5 + i, 7, 9] for i in range(4)]  # a GRPO group: shared prefix
    params = [SamplingParams(max_tokens=6, seed=i) for i in range(4)]
    engine = Engine(tiny_model, EngineConfig(**BASE, page_size=8))
    first = engine.generate(prompts[:1], params[:1])
    rest = engine.generate(prompts[1:], params[1:])
    assert engine.stats["prefix_cache_hit_tokens"] >= 3 * 40 // 8 * 8
    engine.check_invariants()
    for out, prompt, sp in zip(first + rest, prompts, params):
        assert same_bits(jengine.score(tiny_model, prompt, out.token_ids, sp), out.logprobs)
    cold, _ = run(tiny_model, prompts, params, enable_prefix_caching=False)
    for a, b in zip(cold, first + rest):
        assert_same(a, b)


def test_siblings_submitted_together_share_the_prompt_prefill(tiny_model):
    """A GRPO group added at once: one sibling computes the prompt, the others wait one step and
    read its pages from the prefix cache; outputs are those of a run without prefix caching."""
    prompt = random_prompts(1, 512, lo=41, hi=42, seed=12)[0]  # 41 tokens: 5 full pages of 8
    other = random_prompts(1, 512, lo=20, hi=21, seed=13)[0]
    prompts = [prompt] * 4 + [other] * 2
    params = [SamplingParams(max_tokens=5, seed=i) for i in range(6)]
    shared, engine = run(tiny_model, prompts, params, page_size=8, max_num_batched_tokens=256)
    assert engine.stats["prefix_cache_hit_tokens"] == 3 * 40 + 1 * 16
    cold, cold_engine = run(tiny_model, prompts, params, page_size=8, max_num_batched_tokens=256,
                            enable_prefix_caching=False)
    assert cold_engine.stats["prefix_cache_hit_tokens"] == 0
    for a, b in zip(cold, shared):
        assert_same(a, b)


def test_compilations_stay_within_bucket_table(tiny_model):
    prompts = random_prompts(200, 512, lo=1, hi=90, seed=11)
    params = [SamplingParams(max_tokens=1 + i % 7, seed=i, temperature=0.8) for i in range(200)]
    engine = Engine(tiny_model, EngineConfig(max_model_len=256, max_num_seqs=32, max_num_batched_tokens=128))
    outs = engine.generate(prompts, params)
    assert [o.finish_reason in ("length", "stop") for o in outs] == [True] * 200
    assert engine.stats["compilations"] <= engine.stats["bucket_table_size"]
    assert engine.stats["num_pages_free"] == engine.stats["num_pages"]


def test_stops_on_eos_stop_tokens_and_max_tokens(tiny_model):
    engine = Engine(tiny_model, EngineConfig(**BASE))
    base = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=12, seed=3, ignore_eos=True))[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 12
    stop_at = base.token_ids[4]
    first = base.token_ids.index(stop_at)
    out = engine.generate(
        [[5, 6, 7]], SamplingParams(max_tokens=12, seed=3, stop_token_ids=(stop_at,), ignore_eos=True)
    )[0]
    assert out.finish_reason == "stop" and out.token_ids == base.token_ids[: first + 1]
    # the model's EOS: make the token sampled 6th an EOS id of the model, then EOS ends the request
    eos = base.token_ids[5]
    assert eos not in base.token_ids[:5], "pick a seed whose 6th token is new"
    model = Model(tiny_model.config.replace(eos_token_ids=(eos,)), tiny_model.params)
    engine = Engine(model, EngineConfig(**BASE))
    with_eos = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=12, seed=3))[0]
    assert with_eos.finish_reason == "stop" and with_eos.token_ids == base.token_ids[:6]
    assert same_bits(with_eos.logprobs, base.logprobs[:6])
    ignored = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=12, seed=3, ignore_eos=True))[0]
    assert ignored.finish_reason == "length" and ignored.token_ids == base.token_ids


def test_max_model_len_caps_the_completion(tiny_model):
    engine = Engine(tiny_model, EngineConfig(max_model_len=20, max_num_seqs=4, max_num_batched_tokens=16))
    out = engine.generate([list(range(2, 17))], SamplingParams(max_tokens=50, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5


def test_top_logprobs(tiny_model):
    engine = Engine(tiny_model, EngineConfig(**BASE))
    out = engine.generate([[3, 4, 5]], SamplingParams(max_tokens=4, seed=0, logprobs=5, temperature=0.0))[0]
    assert len(out.top_logprobs) == 4
    for tok, lp, top in zip(out.token_ids, out.logprobs, out.top_logprobs):
        assert len(top) == 5 and top[0][0] == tok and top[0][1] == lp  # greedy: the best is sampled
        assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)


@pytest.mark.parametrize(
    "prompt, exc, match",
    [
        ([], ValueError, "empty"),
        ([1, 2, 512], ValueError, "512"),
        ([1, -1], ValueError, "-1"),
        ([1, 2.5], TypeError, "2.5"),
        ("hello", TypeError, "list of ints"),
        (list(range(2, 300)), ValueError, "max_model_len"),
    ],
)
def test_bad_prompts_are_refused_and_nothing_is_lost(tiny_model, prompt, exc, match):
    engine = Engine(tiny_model, EngineConfig(**BASE))
    good = engine.add_request([3, 4, 5], SamplingParams(max_tokens=3, seed=0))
    with pytest.raises(exc, match=match):
        engine.add_request(prompt, SamplingParams(max_tokens=3))
    with pytest.raises(exc):
        engine.generate([[3, 4], prompt])
    done = []
    while engine.has_unfinished_requests():
        done += engine.step()
    assert [o.request_id for o in done] == [good]


def test_abort(tiny_model):
    engine = Engine(tiny_model, EngineConfig(**BASE))
    rid = engine.add_request([3, 4, 5], SamplingParams(max_tokens=50, seed=0, ignore_eos=True))
    for _ in range(3):
        engine.step()
    out = engine.abort(rid)
    assert out.finish_reason == "aborted" and len(out.token_ids) == 3  # prefill samples one
    assert engine.abort(rid) is None  # already finished: a no-op
    engine.FINISHED_IDS_KEPT = 2  # finished ids are remembered for a bounded number of requests
    later = [engine.add_request([1, 2, 3], SamplingParams(max_tokens=2)) for _ in range(2)]
    for r in later:
        engine.abort(r)
    assert list(engine._finished_ids) == later
    with pytest.raises(ValueError, match=later[0]):
        engine.add_request([1], SamplingParams(max_tokens=1), request_id=later[0])
    assert engine.add_request([1], SamplingParams(max_tokens=1), request_id=rid) == rid
    with pytest.raises(KeyError, match="nope"):
        engine.abort("nope")
    engine.check_invariants()
    assert engine.stats["num_pages_free"] == engine.stats["num_pages"]


def test_request_that_can_never_fit_is_refused(tiny_model):
    engine = Engine(tiny_model, EngineConfig(**BASE, num_pages=4, page_size=8))
    with pytest.raises(ValueError, match="KV pages"):
        engine.add_request(list(range(2, 30)), SamplingParams(max_tokens=20))


def test_warmup_compiles_the_whole_table(tiny_model):
    """Warm-up compiles every bucket in threads, reports each one's seconds, and the steps it
    compiled give the bits of steps compiled on first use."""
    cfg = EngineConfig(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32)
    engine = Engine(tiny_model, cfg)
    seconds = engine.warmup(threads=2, progress=False)
    assert sorted(seconds) == [(t, min(t, 4), 0) for t in engine.runner.token_buckets]
    assert all(s >= 0 for s in seconds.values())
    assert engine.warmup() == {}  # nothing left to compile
    prompts, sp = random_prompts(6, 512, seed=5), SamplingParams(max_tokens=3, seed=0)
    warm = engine.generate(prompts, sp)
    assert engine.stats["compilations"] == len(seconds)
    cold = Engine(tiny_model, cfg).generate(prompts, sp)
    for a, b in zip(warm, cold):
        assert a.token_ids == b.token_ids and same_bits(a.logprobs, b.logprobs)
