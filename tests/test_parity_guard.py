"""The runtime parity guard (`EngineConfig(verify_fraction=f)`): re-scores finished requests with
the trainer-side path and counts, traces, or (strict) raises on a mismatch."""

from __future__ import annotations

import json

import jax
import pytest

from jengine import Engine, EngineConfig, SamplingParams
from jengine.engine import VerificationError
from tests.conftest import random_prompts

BASE = dict(max_model_len=128, max_num_seqs=8, max_num_batched_tokens=64)


def _params(n):
    return [SamplingParams(temperature=0.9, top_p=0.9, max_tokens=6, seed=i) for i in range(n)]


def test_every_finished_request_is_verified_and_exact(tiny_model):
    engine = Engine(tiny_model, EngineConfig(**BASE, verify_fraction=1.0))
    engine.generate(random_prompts(6, 512, seed=30), _params(6))
    assert engine.stats["verified_requests"] == 6
    assert engine.stats["verify_mismatches"] == 0


def test_a_fraction_is_a_deterministic_subset(tiny_model):
    counts = []
    for _ in range(2):
        engine = Engine(tiny_model, EngineConfig(**BASE, verify_fraction=0.5))
        engine.generate(random_prompts(16, 512, seed=31), _params(16))
        counts.append(engine.stats["verified_requests"])
    assert counts[0] == counts[1] and 0 < counts[0] < 16


def _perturbed_behind_the_engines_back(engine):
    """Changes the served weights without update_weights: the policy version stays, so the
    guard re-scores tokens the old weights produced with the new ones (a silent corruption)."""
    engine.runner.params = jax.tree_util.tree_map(lambda x: x * 1.01, engine.runner.params)


def test_a_corrupted_rollout_is_counted_and_traced(tiny_model, tmp_path):
    trace = tmp_path / "trace.jsonl"
    engine = Engine(tiny_model, EngineConfig(**BASE, verify_fraction=1.0, trace_path=str(trace)))
    for p, sp in zip(random_prompts(4, 512, seed=32), _params(4)):
        engine.add_request(p, sp)
    for _ in range(3):
        engine.step()
    _perturbed_behind_the_engines_back(engine)
    while engine.has_unfinished_requests():
        engine.step()
    engine.close()
    assert engine.stats["verified_requests"] == 4
    assert engine.stats["verify_mismatches"] == 4
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    flagged = [rid for r in records for rid in r.get("verify_mismatches", [])]
    assert sorted(flagged) == [f"req-{i}" for i in range(4)]


def test_strict_mode_raises(tiny_model):
    engine = Engine(tiny_model, EngineConfig(**BASE, verify_fraction=1.0, verify_strict=True))
    engine.add_request([3, 4, 5], _params(1)[0])
    engine.step()
    _perturbed_behind_the_engines_back(engine)
    with pytest.raises(VerificationError, match="req-0"):
        while engine.has_unfinished_requests():
            engine.step()


def test_requests_spanning_a_weight_update_are_not_verified(tiny_model):
    """Their tokens come from two policies (or KV from the older one): no single params
    reproduce them, so the guard leaves them out rather than report a false mismatch."""
    engine = Engine(tiny_model, EngineConfig(**BASE, verify_fraction=1.0))
    for p, sp in zip(random_prompts(3, 512, seed=33), _params(3)):
        engine.add_request(p, sp)
    engine.step()
    engine.update_weights(jax.tree_util.tree_map(lambda x: x * 1.01, tiny_model.params))
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.stats["verified_requests"] == 0 and engine.stats["verify_mismatches"] == 0
