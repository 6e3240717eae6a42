"""The promise under sweeps of model-generated data: every sampled token's rollout logprob is
bitwise `jengine.score`'s and `rl.token_logprobs`', whatever the row length, the batch mix, the
sampling settings, the model family and dtype, and the turns of a trajectory.

The quick tier sweeps the widths where tiles and pages turn over (whole and partial sampling
tiles, powers of two and one past them); the slow tier sweeps every width from 2 to 130, the
Gemma, soft-capped and bf16 paths at eight turnover widths, and runs the fuzzer.
tests/exactness.py has the helpers.
"""

from __future__ import annotations

import numpy as np
import pytest

from jengine import Model, ModelConfig, SamplingParams, init_params, rl
from tests import exactness

LENGTH = 132  # rows of the pool: every width up to 130 can be cut from them
SHORT_WIDTHS = (2, 3, 8, 9, 16, 17, 24, 33)  # whole and partial sampling tiles, pages
LONG_WIDTHS = (40, 64, 65, 81, 97, 128, 129, 130)
QUICK_WIDTHS = SHORT_WIDTHS + LONG_WIDTHS


def _variant(name: str) -> Model:
    if name == "tiny":
        cfg = ModelConfig.named("tiny")
    elif name == "tiny-bf16":
        cfg = ModelConfig.named("tiny").replace(dtype="bfloat16")
    elif name == "gemma3":
        cfg = ModelConfig.named("tiny-gemma3")
    else:  # Gemma 2's soft caps on attention scores and final logits
        cfg = ModelConfig.named("tiny-gemma3").replace(attn_logit_softcap=50.0,
                                                       final_logit_softcap=5.0)  # fmt: skip
    return Model(cfg, init_params(cfg, seed=1))


_POOLS: dict = {}


def _pool(name: str):
    if name not in _POOLS:
        model = _variant(name)
        engine = exactness.engine_for(model, LENGTH + 8)
        _POOLS[name] = (model, engine.numerics, exactness.rollout_pool(engine, length=LENGTH))
    return _POOLS[name]


@pytest.mark.parametrize("widths", [SHORT_WIDTHS, LONG_WIDTHS], ids=["short", "long"])
def test_trainer_side_matches_the_rollout_at_turnover_widths(widths):
    model, numerics, pool = _pool("tiny")
    assert not exactness.sweep(model, numerics, pool, widths)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny", "tiny-bf16", "gemma3", "soft-capped"])
def test_trainer_side_matches_the_rollout_at_every_width(name):
    model, numerics, pool = _pool(name)
    widths = range(2, 131) if name == "tiny" else (2, 9, 16, 17, 33, 64, 65, 129)
    assert not exactness.sweep(model, numerics, pool, widths)


def test_multi_turn_trajectory_scored_in_one_row():
    """Turns generated with prefix caching and preemption, other requests in every step, the
    environment's tokens between turns; the whole trajectory teacher-forced as one row gives every
    model token its rollout bits."""
    cfg = ModelConfig.named("tiny")
    model = Model(cfg, init_params(cfg, seed=2))
    engine = exactness.engine_for(model, 160, num_pages=24)  # 6 trajectories need ~36 pages
    rng = np.random.default_rng(7)
    settings = exactness.SETTINGS
    trajs = [dict(tokens=list(map(int, rng.integers(2, cfg.vocab_size, 3 + i))), model=[], lp=[],
                  params=settings[i % len(settings)]) for i in range(6)]  # fmt: skip
    prompt_lens = [len(t["tokens"]) for t in trajs]
    for turn in range(4):
        params = [SamplingParams(**{**_fields(t["params"]), "max_tokens": 10 + 3 * turn,
                                    "ignore_eos": True, "seed": 100 * turn + i})
                  for i, t in enumerate(trajs)]  # fmt: skip
        fillers = [list(map(int, rng.integers(2, cfg.vocab_size, 20))) for _ in range(3)]
        outs = engine.generate([t["tokens"] for t in trajs] + fillers,
                               params + [SamplingParams(max_tokens=8, seed=turn)] * 3)  # fmt: skip
        for t, o in zip(trajs, outs):
            start = len(t["tokens"])
            t["tokens"] += list(o.token_ids)
            t["model"] += range(start, len(t["tokens"]))
            t["lp"] += list(np.asarray(o.logprobs, np.float32))
            t["tokens"] += list(map(int, rng.integers(2, cfg.vocab_size, 2 + turn)))  # env turn
    stats = engine.stats
    assert stats["preemptions"] > 0 and stats["prefix_cache_hit_tokens"] > 0, stats
    b = rl.pack([t["tokens"][:p] for t, p in zip(trajs, prompt_lens)],
                [t["tokens"][p:] for t, p in zip(trajs, prompt_lens)])  # fmt: skip
    values = np.asarray(rl.token_logprobs(model.params, cfg, b["tokens"], b["prompt_lens"],
                                          b["completion_lens"], numerics=engine.numerics,
                                          sampling_params=[t["params"] for t in trajs]))  # fmt: skip
    for t, row in zip(trajs, values):
        got = row[np.asarray(t["model"]) - 1]
        assert np.array_equal(exactness.bits(got), exactness.bits(t["lp"]))


def _fields(p: SamplingParams) -> dict:
    return dict(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p)


@pytest.mark.slow
def test_fuzzer_finds_no_mismatch():
    """A fixed (derandomized) set of drawn workloads; `python -m tests.fuzz_exactness` runs more."""
    from tests import fuzz_exactness

    fuzz_exactness.fuzz(max_examples=4)
