"""Bad input everywhere: every public entry point refuses a bad argument with a clear error naming
it, BEFORE any state changes, and the engine then serves its earlier requests exactly as if the bad
call had never happened. A request that can never fit in the KV pool is refused up front (it would
otherwise livelock: preempting itself forever)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jengine
from jengine import EngineConfig, Model, ModelConfig, RopeScaling, SamplingParams
from jengine.engine import Engine
from tests.conftest import same_bits

# Same shapes as the property and load tests: the step compiles once per session.
CFG = dict(num_pages=12, page_size=4, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32)
GOOD = [
    ([3, 4, 5, 6, 7], SamplingParams(max_tokens=6, seed=1, temperature=0.8)),
    ([9, 10, 11], SamplingParams(max_tokens=5, seed=2, top_k=20)),
]
VOCAB = 512


@pytest.fixture(scope="module")
def reference(tiny_model):
    """The GOOD requests' outputs on an engine that never saw bad input."""
    return Engine(tiny_model, EngineConfig(**CFG)).generate(
        [p for p, _ in GOOD], [sp for _, sp in GOOD]
    )


def _started(model):
    """An engine serving the GOOD requests, a couple of steps in (mid prefill/decode)."""
    engine = Engine(model, EngineConfig(**CFG))
    ids = [engine.add_request(p, sp) for p, sp in GOOD]
    engine.step()
    engine.step()
    return engine, ids


def _snapshot(engine):
    s = engine.schedulers[0]
    a = s.allocator
    return (
        sorted(engine._seqs),
        [x.request_id for x in s.running],
        [x.request_id for x in s.waiting],
        list(a.refcount),
        a.num_free,
        dict(a._cached),
        engine.policy_version,
        engine.paused,
        len(engine._undelivered),
        sorted(engine._finished_ids),
        [
            (x.request_id, list(x.tokens), x.num_computed, list(x.pages))
            for x in s.running + s.waiting
        ],
    )


def _drain_and_compare(engine, ids, reference):
    outs = {}
    for _ in range(500):
        if not engine.has_unfinished_requests():
            break
        for o in engine.step():
            assert o.request_id not in outs
            outs[o.request_id] = o
    assert not engine.has_unfinished_requests()
    assert sorted(outs) == sorted(ids), "the bad call added or lost a request"
    for rid, ref in zip(ids, reference):
        assert outs[rid].token_ids == ref.token_ids
        assert same_bits(outs[rid].logprobs, ref.logprobs)
    engine.check_invariants()
    assert engine.schedulers[0].allocator.num_free == engine.num_pages


def _bad_params(kind):
    def make(model):
        p = jax.tree_util.tree_map(lambda x: x, model.params)
        layers = dict(p["layers"])
        p = dict(p, layers=layers)
        if kind == "nan":
            layers["wq"] = layers["wq"].at[1, 0, 0].set(jnp.nan)
        elif kind == "inf":
            p["embed"] = p["embed"].at[5, 3].set(-jnp.inf)
        elif kind == "shape":
            p["final_norm"] = jnp.ones((7,), jnp.float32)
        elif kind == "dtype":
            p["final_norm"] = p["final_norm"].astype(jnp.bfloat16)
        elif kind == "missing":
            del layers["w_up"]
        elif kind == "extra":
            p["lm_head"] = p["embed"]
        elif kind == "list_leaf":
            p["final_norm"] = [1.0] * 128
        return p

    return make


# (description, call(engine, model), exception, message fragment naming the argument)
ENGINE_CASES = [
    # add_request: the prompt
    ("prompt str", lambda e, m: e.add_request("hello"), TypeError, "prompt_token_ids"),
    ("prompt None", lambda e, m: e.add_request(None), TypeError, "prompt_token_ids"),
    ("prompt dict", lambda e, m: e.add_request({1: 2}), TypeError, "prompt_token_ids"),
    ("prompt empty", lambda e, m: e.add_request([]), ValueError, "empty"),
    ("prompt float", lambda e, m: e.add_request([3, 4.0]), TypeError, "prompt_token_ids"),
    ("prompt bool", lambda e, m: e.add_request([3, True]), TypeError, "prompt_token_ids"),
    ("prompt nested", lambda e, m: e.add_request([[3, 4]]), TypeError, "prompt_token_ids"),
    ("prompt nan", lambda e, m: e.add_request([3, float("nan")]), TypeError, "prompt_token_ids"),
    (
        "prompt np float",
        lambda e, m: e.add_request(np.array([3.0, 4.0])),
        TypeError,
        "prompt_token_ids",
    ),
    ("token -1", lambda e, m: e.add_request([3, -1]), ValueError, "-1"),
    ("token = vocab", lambda e, m: e.add_request([3, VOCAB]), ValueError, str(VOCAB)),
    ("token huge", lambda e, m: e.add_request([3, 2**40]), ValueError, str(2**40)),
    ("prompt = max_model_len", lambda e, m: e.add_request([3] * 64), ValueError, "max_model_len"),
    # a request that fits max_model_len but can never fit the 12-page pool (48 tokens)
    (
        "never fits the pool",
        lambda e, m: e.add_request([3] * 40, SamplingParams(max_tokens=20)),
        ValueError,
        "KV pages",
    ),
    (
        "never fits: huge max_tokens",
        lambda e, m: e.add_request([3, 4], SamplingParams(max_tokens=10**9)),
        ValueError,
        "KV pages",
    ),
    # add_request: the other arguments
    (
        "params dict",
        lambda e, m: e.add_request([3], {"max_tokens": 2}),
        TypeError,
        "sampling_params",
    ),
    (
        "stop_token_ids >= vocab",
        lambda e, m: e.add_request([3], SamplingParams(stop_token_ids=(VOCAB,))),
        ValueError,
        "stop_token_ids",
    ),
    ("stop not callable", lambda e, m: e.add_request([3], stop=5), TypeError, "stop"),
    (
        "stop strings, no tokenizer",
        lambda e, m: e.add_request([3], SamplingParams(stop=("</a>",))),
        ValueError,
        "tokenizer",
    ),
    ("request_id int", lambda e, m: e.add_request([3], request_id=7), TypeError, "request_id"),
    ("request_id empty", lambda e, m: e.add_request([3], request_id=""), TypeError, "request_id"),
    (
        "request_id live",
        lambda e, m: e.add_request([3], request_id="req-0"),
        ValueError,
        "request_id",
    ),
    # generate: everything is checked before the first request is queued
    ("generate str", lambda e, m: e.generate("abc"), TypeError, "prompts"),
    ("generate np", lambda e, m: e.generate(np.array([[3, 4]])), TypeError, "prompts"),
    (
        "generate bad 2nd prompt",
        lambda e, m: e.generate([[3, 4], [3, -5]]),
        ValueError,
        r"prompts\[1\]",
    ),
    (
        "generate bad 2nd params",
        lambda e, m: e.generate([[3, 4], [5, 6]], [SamplingParams(), {"seed": 1}]),
        TypeError,
        r"prompts\[1\].*sampling_params",
    ),
    (
        "generate 2nd never fits",
        lambda e, m: e.generate([[3, 4], [3] * 40], SamplingParams(max_tokens=20)),
        ValueError,
        r"prompts\[1\].*KV pages",
    ),
    (
        "generate 2nd stop id",
        lambda e, m: e.generate(
            [[3, 4], [5, 6]], [SamplingParams(), SamplingParams(stop_token_ids=(9999,))]
        ),
        ValueError,
        "stop_token_ids",
    ),
    (
        "generate params count",
        lambda e, m: e.generate([[3, 4]], [SamplingParams()] * 2),
        ValueError,
        "sampling_params",
    ),
    # abort
    ("abort unknown", lambda e, m: e.abort("nope"), KeyError, "nope"),
    ("abort list", lambda e, m: e.abort(["req-0"]), TypeError, "request_id"),
    ("abort None", lambda e, m: e.abort(None), TypeError, "request_id"),
    # update_weights
    ("update mode", lambda e, m: e.update_weights(m.params, mode="Keep"), ValueError, "mode"),
    ("update mode None", lambda e, m: e.update_weights(m.params, mode=None), ValueError, "mode"),
    ("update None", lambda e, m: e.update_weights(None), ValueError, "structure"),
    ("update Model", lambda e, m: e.update_weights(m), ValueError, "structure"),
    (
        "update nan",
        lambda e, m: e.update_weights(_bad_params("nan")(m)),
        ValueError,
        r"\['wq'\].*non-finite",
    ),
    (
        "update inf",
        lambda e, m: e.update_weights(_bad_params("inf")(m), mode="recompute"),
        ValueError,
        "embed",
    ),
    (
        "update shape",
        lambda e, m: e.update_weights(_bad_params("shape")(m)),
        ValueError,
        "final_norm",
    ),
    (
        "update dtype",
        lambda e, m: e.update_weights(_bad_params("dtype")(m)),
        ValueError,
        "final_norm",
    ),
    (
        "update missing",
        lambda e, m: e.update_weights(_bad_params("missing")(m)),
        ValueError,
        "structure",
    ),
    (
        "update extra",
        lambda e, m: e.update_weights(_bad_params("extra")(m)),
        ValueError,
        "structure",
    ),
    (
        "update list leaf",
        lambda e, m: e.update_weights(_bad_params("list_leaf")(m)),
        ValueError,
        "structure",
    ),
]


@pytest.mark.parametrize("case", ENGINE_CASES, ids=[c[0] for c in ENGINE_CASES])
def test_engine_refuses_bad_input_before_any_state_change(tiny_model, reference, case):
    _, call, exc, match = case
    engine, ids = _started(tiny_model)
    before = _snapshot(engine)
    params = engine.runner.params
    with pytest.raises(exc, match=match):
        call(engine, tiny_model)
    assert _snapshot(engine) == before, "state changed before the argument was refused"
    assert engine.runner.params is params
    _drain_and_compare(engine, ids, reference)


def test_generate_on_a_paused_engine_queues_nothing(tiny_model, reference):
    engine, ids = _started(tiny_model)
    engine.pause()
    before = _snapshot(engine)
    with pytest.raises(RuntimeError, match="paused"):
        engine.generate([[3, 4]])
    assert _snapshot(engine) == before
    engine.resume()
    _drain_and_compare(engine, ids, reference)


def test_finished_request_id_cannot_be_reused_and_auto_ids_never_collide(tiny_model, reference):
    engine = Engine(tiny_model, EngineConfig(**CFG))
    # a caller-chosen id that looks like the engine's own: the next auto id must not overwrite it
    mine = engine.add_request(GOOD[0][0], GOOD[0][1], request_id="req-1")
    auto0 = engine.add_request([3, 4], SamplingParams(max_tokens=2, seed=0))
    auto1 = engine.add_request(GOOD[1][0], GOOD[1][1])
    assert len({mine, auto0, auto1}) == 3
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step()})
    assert sorted(outs) == sorted([mine, auto0, auto1])
    for rid, ref in ((mine, reference[0]), (auto1, reference[1])):
        assert outs[rid].token_ids == ref.token_ids and same_bits(
            outs[rid].logprobs, ref.logprobs
        )
    assert engine.schedulers[0].allocator.num_free == engine.num_pages
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request([3], request_id=mine)


# -- the Engine constructor --------------------------------------------------------------------


def _model_with(model, **changes):
    p = dict(model.params, **changes)
    return Model(model.config, p)


CTOR_CASES = [
    ("model None", lambda m: Engine(None, EngineConfig(**CFG)), TypeError, "model"),
    ("model params", lambda m: Engine(m.params, EngineConfig(**CFG)), TypeError, "model"),
    ("config dict", lambda m: Engine(m, dict(CFG)), TypeError, "config"),
    (
        "max_model_len > positions",
        lambda m: Engine(m, EngineConfig(**{**CFG, "max_model_len": 4096})),
        ValueError,
        "max_model_len",
    ),
    (
        "params for another config",
        lambda m: Engine(
            _model_with(m, layers=dict(m.params["layers"], w_up=m.params["layers"]["w_up"][..., :100])),
            EngineConfig(**CFG),
        ),
        ValueError,
        "model.params",
    ),
    (
        "params missing lm_head",
        lambda m: Engine(
            Model(m.config.replace(tie_word_embeddings=False), m.params), EngineConfig(**CFG)
        ),
        ValueError,
        "model.params",
    ),
    (
        "non-finite params",
        lambda m: Engine(
            _model_with(m, final_norm=m.params["final_norm"].at[0].set(jnp.nan)),
            EngineConfig(**CFG),
        ),
        ValueError,
        "non-finite",
    ),
]


@pytest.mark.parametrize("case", CTOR_CASES, ids=[c[0] for c in CTOR_CASES])
def test_engine_constructor_refuses_bad_input(tiny_model, case):
    _, call, exc, match = case
    with pytest.raises(exc, match=match):
        call(tiny_model)


# -- config dataclasses ------------------------------------------------------------------------

SAMPLING_CASES = [
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=1e-9), "temperature"),  # raw / T overflows fp32 into NaN logprobs
    (dict(temperature="1"), "temperature"),
    (dict(temperature=None), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=1.5), "top_k"),
    (dict(top_k=2**31), "top_k"),  # would overflow the device's int32 mid-step
    (dict(top_k=True), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(min_p=-0.1), "min_p"),
    (dict(min_p=2.0), "min_p"),
    (dict(min_p=float("nan")), "min_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=2.0), "max_tokens"),
    (dict(max_tokens=True), "max_tokens"),
    (dict(seed=-1), "seed"),
    (dict(seed=2**31), "seed"),
    (dict(seed="x"), "seed"),
    (dict(stop_token_ids=[1]), "stop_token_ids"),
    (dict(stop_token_ids=(-1,)), "stop_token_ids"),
    (dict(stop_token_ids=(1.5,)), "stop_token_ids"),
    (dict(ignore_eos="yes"), "ignore_eos"),
    (dict(stop="</a>"), "stop"),  # a str, not a tuple of strs
    (dict(stop=["</a>"]), "stop"),
    (dict(stop=("",)), "stop"),
    (dict(stop=(3,)), "stop"),
    (dict(include_stop_str_in_output=1), "include_stop_str_in_output"),
    (dict(logprobs=21), "logprobs"),
    (dict(logprobs=-1), "logprobs"),
]


@pytest.mark.parametrize("kwargs, field", SAMPLING_CASES, ids=[repr(c[0]) for c in SAMPLING_CASES])
def test_sampling_params_refuse_bad_values(kwargs, field):
    with pytest.raises((TypeError, ValueError), match=field):
        SamplingParams(**kwargs)


ENGINE_CONFIG_CASES = [
    (dict(page_size=3), "page_size"),
    (dict(page_size=0), "page_size"),
    (dict(page_size=4.0), "page_size"),
    (dict(num_pages=0), "num_pages"),
    (dict(num_pages=2.5), "num_pages"),
    (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(max_num_seqs=64, max_num_batched_tokens=32), "max_num_batched_tokens"),
    (dict(max_num_batched_tokens=0), "max_num_batched_tokens"),
    (dict(max_model_len=1), "max_model_len"),
    (dict(max_model_len=64.0), "max_model_len"),
    (dict(logprobs_mode="logprobs"), "logprobs_mode"),
    (dict(lm_head_dtype="float16"), "lm_head_dtype"),
    (dict(enable_prefix_caching="yes"), "enable_prefix_caching"),
    (dict(tensor_parallel_size=0), "tensor_parallel_size"),
    (dict(data_parallel_size=0), "data_parallel_size"),
    (dict(seed=-1), "seed"),
    (dict(numerics="exact"), "numerics"),
    (dict(kernel_backend="gpu"), "kernel_backend"),
    (dict(check_finite="no"), "check_finite"),
    (dict(trace_path=123), "trace_path"),  # an int would be opened as a file descriptor
]


@pytest.mark.parametrize(
    "kwargs, field", ENGINE_CONFIG_CASES, ids=[repr(c[0]) for c in ENGINE_CONFIG_CASES]
)
def test_engine_config_refuses_bad_values(kwargs, field):
    with pytest.raises((TypeError, ValueError), match=field):
        EngineConfig(**kwargs)


MODEL_CONFIG_CASES = [
    (dict(vocab_size=0), "vocab_size"),
    (dict(hidden_size=-1), "hidden_size"),
    (dict(num_layers=1.0), "num_layers"),
    (dict(num_heads=8, num_kv_heads=3), "num_kv_heads"),
    (dict(head_dim=15), "head_dim"),
    (dict(rope_theta=float("nan")), "rope_theta"),
    (dict(rms_norm_eps=-1.0), "rms_norm_eps"),
    (dict(dtype="float16"), "dtype"),
    (dict(eos_token_ids=[1]), "eos_token_ids"),
    (dict(eos_token_ids=(512,)), "eos_token_ids"),
    (dict(bos_token_id=512), "bos_token_id"),
    (dict(bos_token_id=-1), "bos_token_id"),
    (dict(tie_word_embeddings="yes"), "tie_word_embeddings"),
    (dict(qkv_bias=1), "qkv_bias"),
    (dict(name=5), "name"),
    (dict(rope_scaling={"factor": 8.0}), "rope_scaling"),
    (dict(max_position_embeddings=0), "max_position_embeddings"),
]


@pytest.mark.parametrize(
    "kwargs, field", MODEL_CONFIG_CASES, ids=[repr(c[0]) for c in MODEL_CONFIG_CASES]
)
def test_model_config_refuses_bad_values(kwargs, field):
    with pytest.raises((TypeError, ValueError), match=field):
        ModelConfig.named("tiny").replace(**kwargs)


def test_rope_scaling_refuses_bad_values():
    good = dict(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
    )
    RopeScaling(**good)
    for bad, field in [
        (dict(factor=0.5), "factor"),
        (dict(high_freq_factor=0.5), "high_freq_factor"),
        (dict(original_max_position_embeddings=0), "original_max_position_embeddings"),
    ]:
        with pytest.raises((TypeError, ValueError), match=field):
            RopeScaling(**{**good, **bad})


def test_model_config_from_dict_refuses_unknown_fields():
    d = ModelConfig.named("tiny").to_dict()
    with pytest.raises(ValueError, match="hiden_size"):
        ModelConfig.from_dict({**d, "hiden_size": 3})
    with pytest.raises(ValueError, match="architecture"):
        ModelConfig.from_dict({"hidden_size": 8, "num_attention_heads": 2, "model_type": "gpt2"})


# -- jengine.score -----------------------------------------------------------------------------

SCORE_CASES = [
    ("model str", lambda m: jengine.score("tiny", [3, 4], [5]), TypeError, "model"),
    ("prompt str", lambda m: jengine.score(m, "abc", [5]), TypeError, "prompt_token_ids"),
    ("prompt floats", lambda m: jengine.score(m, [3.0, 4.0], [5]), TypeError, "prompt_token_ids"),
    ("prompt bools", lambda m: jengine.score(m, [True, 4], [5]), TypeError, "prompt_token_ids"),
    (
        "completion None",
        lambda m: jengine.score(m, [3, 4], None),
        TypeError,
        "completion_token_ids",
    ),
    ("prompt empty", lambda m: jengine.score(m, [], [5]), ValueError, "prompt_token_ids"),
    ("token oob", lambda m: jengine.score(m, [3, 4], [VOCAB]), ValueError, "completion_token_ids"),
    ("token negative", lambda m: jengine.score(m, [3, -4], [5]), ValueError, "prompt_token_ids"),
    ("batch mismatch", lambda m: jengine.score(m, [[3], [4]], [[5]]), ValueError, "completions"),
    (
        "too long",
        lambda m: jengine.score(m, [3] * 1000, [5] * 100),
        ValueError,
        "max_position_embeddings",
    ),
    (
        "params dict",
        lambda m: jengine.score(m, [3], [5], {"temperature": 1.0}),
        ValueError,
        "sampling_params",
    ),
    (
        "params count",
        lambda m: jengine.score(m, [[3], [4]], [[5], [6]], [SamplingParams()]),
        ValueError,
        "sampling_params",
    ),
    (
        "logprobs_mode",
        lambda m: jengine.score(m, [3], [5], logprobs_mode="lp"),
        ValueError,
        "logprobs_mode",
    ),
    (
        "numerics as a string",
        lambda m: jengine.score(m, [3], [5], numerics="fast"),
        TypeError,
        "numerics",
    ),
    (
        "column blocks the model cannot split",
        lambda m: jengine.score(m, [3], [5], numerics=jengine.Numerics(column_blocks=3)),
        ValueError,
        "column_blocks=3",
    ),
]


@pytest.mark.parametrize("case", SCORE_CASES, ids=[c[0] for c in SCORE_CASES])
def test_score_refuses_bad_input(tiny_model, case):
    _, call, exc, match = case
    with pytest.raises(exc, match=match):
        call(tiny_model)


# -- load_model (skipped where the loader is absent) --------------------------------------------


def test_load_model_refuses_bad_input(tmp_path):
    loading = pytest.importorskip("jengine.models.loading")
    if not hasattr(loading, "load_model"):
        pytest.skip("jengine.models.loading.load_model not written yet")
    load_model, CheckpointError = loading.load_model, loading.CheckpointError
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(str(tmp_path / "missing" / "dir"))
    with pytest.raises(CheckpointError, match="gguf"):
        load_model(str(tmp_path / "model.gguf"))
    with pytest.raises(ValueError, match="no shipped config"):
        load_model("no-such-model")
    with pytest.raises(ValueError, match="dtype"):
        load_model("tiny", dtype="float16")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(str(empty))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(CheckpointError, match="bad.json"):
        load_model(str(bad_json))
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"vocab_size": 0}')
    with pytest.raises(CheckpointError, match="wrong.json"):
        load_model(str(wrong))
