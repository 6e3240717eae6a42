"""The JSONL step trace (schema, types, monotone steps) and the parity metrics."""

import itertools
import json

import numpy as np
import pytest

from jengine import EngineConfig, SamplingParams, diagnostics
from jengine.engine import Engine
from tests.conftest import random_prompts


@pytest.fixture(scope="module")
def traced_run(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "trace.jsonl"
    config = EngineConfig(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=16,
                          trace_path=str(path))  # fmt: skip
    engine = Engine(tiny_model, config)
    prompts = random_prompts(5, tiny_model.config.vocab_size, lo=3, hi=30, seed=4)
    params = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=6, seed=1)
    outs = engine.generate(prompts, params)
    engine.close()
    return path, prompts, params, config, outs


def test_trace_records_follow_the_schema(traced_run):
    path, prompts, _params, _, outs = traced_run
    lines = path.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert records and records == diagnostics.read_trace(path)
    for r in records:
        for key, types in diagnostics.TRACE_SCHEMA.items():
            assert key in r, key
            assert isinstance(r[key], types) and (isinstance(r[key], bool) == (types is bool)), key
    assert [r["step"] for r in records] == list(range(len(records)))
    assert all(b["preemptions"] >= a["preemptions"] for a, b in itertools.pairwise(records))
    assert records[0]["compiled"] and records[0]["prefill_tokens"] > 0
    assert sum(r["prefill_tokens"] for r in records) >= sum(map(len, prompts))
    # every sampled token came from a step: the last prompt token's row or a decode row
    assert sum(r["decode_tokens"] for r in records) == sum(len(o.token_ids) - 1 for o in outs)
    diagnostics.validate_trace(records, strict=True)
    s = diagnostics.summarize_trace(records)
    assert s["steps"] == len(records) and s["compiled_steps"] >= 1
    assert s["policy_versions"] == [0] and s["max_seqs"] <= 4


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r.pop("pages_free"), "missing key 'pages_free'"),
        (lambda r: r.update(compiled=1), "compiled=1"),
        (lambda r: r.update(step_seconds="1"), "step_seconds"),
        (lambda r: r.update(decode_tokens=10**6), "exceeds bucket_tokens"),
        (lambda r: r.update(seqs=-1), "negative"),
    ],
)
def test_validate_trace_names_the_fault(traced_run, mutate, message):
    records = diagnostics.read_trace(traced_run[0])
    mutate(records[-1])
    with pytest.raises(diagnostics.TraceError, match=message):
        diagnostics.validate_trace(records)


def test_validate_trace_checks_step_order(traced_run):
    records = diagnostics.read_trace(traced_run[0])
    if len(records) < 3:
        pytest.skip("needs three steps")
    del records[1]
    with pytest.raises(diagnostics.TraceError, match="follows"):
        diagnostics.validate_trace(records)


def test_read_trace_names_a_bad_line(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"step": 0}\nnot json\n')
    with pytest.raises(diagnostics.TraceError, match="t.jsonl:2"):
        diagnostics.read_trace(p)


def test_parity_report_is_exact_with_engine_settings(tiny_model, traced_run):
    _, prompts, params, config, outs = traced_run
    rep = diagnostics.parity_report(
        tiny_model, outs, prompts, params, numerics=config.resolved_numerics(),
        logprobs_mode=config.logprobs_mode,
    )  # fmt: skip
    n = sum(len(o.token_ids) for o in outs)
    assert rep["num_tokens"] == rep["bitwise_equal"] == n
    assert rep["sequences_bitwise_equal"] == len(outs)
    assert rep["max_abs_diff"] == 0.0 and rep["k3"] == 0.0 and rep["k1"] == 0.0
    assert rep["ratio_mean"] == 1.0 and rep["ess_frac"] == 1.0 and rep["clip_frac"] == 0.0
    assert rep["first_mismatch"] is None
    text = diagnostics.format_parity_report(rep)
    assert f"{n} / {n}" in text


def test_mismatch_metrics_by_hand():
    rollout = [np.array([-1.0, -2.0], np.float32), np.array([-0.5], np.float32)]
    trainer = [np.array([-1.0, -2.5], np.float32), np.array([-0.25], np.float32)]
    m = diagnostics.mismatch_metrics(trainer, rollout)
    r = np.array([0.0, -0.5, 0.25])
    assert m["num_tokens"] == 3 and m["bitwise_equal"] == 1
    assert m["sequences_bitwise_equal"] == 0 and m["first_mismatch"] == [0, 1]
    assert m["max_abs_diff"] == 0.5
    np.testing.assert_allclose(m["ratio_mean"], np.exp(r).mean(), rtol=1e-6)
    np.testing.assert_allclose(m["k3"], np.mean(np.exp(r) - r - 1), rtol=1e-6)
    np.testing.assert_allclose(m["k1"], np.mean(-r), rtol=1e-6)
    np.testing.assert_allclose(m["clip_frac"], 2 / 3, rtol=1e-6)
    w = np.exp(r)
    np.testing.assert_allclose(m["ess_frac"], w.sum() ** 2 / (3 * (w**2).sum()), rtol=1e-6)
    # equal -inf entries count as equal, not as NaN differences
    inf = np.array([-np.inf], np.float32)
    assert diagnostics.mismatch_metrics([inf], [inf])["max_abs_diff"] == 0.0
    logits = diagnostics.mismatch_metrics(trainer, rollout, are_logprobs=False)
    assert logits["ratio_mean"] is None and logits["max_abs_diff"] == 0.5
