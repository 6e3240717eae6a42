"""The promise under sweeps of model-generated data: every sampled token's rollout logprob is
bitwise `jengine.score`'s and `rl.token_logprobs`', whatever the row length, the batch mix, the
sampling settings, the model family and dtype, and the turns of a trajectory.

The quick tier sweeps the widths where tiles and pages turn over (whole and partial sampling
tiles, powers of two and one past them); the slow tier sweeps every width from 2 to 130, the
Gemma, soft-capped and bf16 paths at eight turnover widths, and runs the fuzzer.
tests/exactness.py has the helpers.
"""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest

from jengine import (Engine, EngineConfig, Model, ModelConfig, SamplingParams, diagnostics,
                     init_params, rl)  # fmt: skip
from tests import exactness

LENGTH = 132  # rows of the pool: every width up to 130 can be cut from them
# the quick tier's widths: the shortest row, and rows of whole sampling tiles (n - 1 = 8, 16, 32:
# where the trainer's program once summed differently); the slow sweep takes every width 2-130,
# the longer turnover widths (64, 65, 128, 129, 130) among them
TURNOVER_WIDTHS = (2, 9, 17, 33)


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


def test_trainer_side_matches_the_rollout_at_turnover_widths():
    model, numerics, pool = _pool("tiny")
    assert not exactness.sweep(model, numerics, pool, TURNOVER_WIDTHS)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny", "tiny-bf16", "gemma3", "soft-capped"])
def test_trainer_side_matches_the_rollout_at_every_width(name):
    model, numerics, pool = _pool(name)
    widths = range(2, 131) if name == "tiny" else (2, 9, 16, 17, 33, 64, 65, 129)
    assert not exactness.sweep(model, numerics, pool, widths)


def test_multi_turn_trajectories_scored_in_one_row(tiny_tokenizer, tmp_path):
    """`rl.MultiTurn` on a small pool (preemption), with other requests in the batch: 2-6 model
    turns per trajectory, per-turn stops (stop string, stop token id, max_tokens), environment
    tokens between (random ids from a sync environment, tool messages that an async one renders
    with the chat template). With the prefix cache on (continuations served from it) and off
    (recomputed) the trajectories are the same bits; each turn's prompt is exactly the last one
    plus the model's and the environment's tokens, although decoding the model's tokens and
    encoding them again gives other ids; the step trace counts the prompt tokens the cache served;
    and the trainer-side logprobs of the packed trajectories are every model token's rollout
    logprob, bit for bit."""
    tok, cfg = tiny_tokenizer, ModelConfig.named("tiny")
    model, chat = Model(cfg, init_params(cfg, seed=2)), rl.ChatTemplate(tiny_tokenizer)

    def turns_left(traj) -> bool:  # trajectory i runs 2 + i % 5 model turns
        return len(traj.model_turns) < 2 + traj.index % 5

    def env(traj):
        rng = np.random.default_rng(100 * traj.index + len(traj.turns))
        return list(map(int, rng.integers(2, cfg.vocab_size, 2 + len(traj.turns)))) if turns_left(
            traj) else None  # fmt: skip

    async def tool(traj):
        await asyncio.sleep(0)
        message = {"role": "tool", "content": f"{traj.index} * {len(traj.turns)} = 42"}
        return chat.env([message], after=traj.turns[-1].token_ids) if turns_left(traj) else None

    rng = np.random.default_rng(7)
    prompts = [chat.prompt([{"role": "user", "content": f"What is {i} * 7?"}]) for i in range(6)]
    params = [dataclasses.replace(exactness.SETTINGS[i], max_tokens=10 + 2 * i, seed=i,
                                  stop=("7",) * (i % 3 == 0), stop_token_ids=(5,) * (i % 3 == 1))
              for i in range(6)]  # fmt: skip
    fillers = [list(map(int, rng.integers(2, cfg.vocab_size, 20))) for _ in range(3)]

    def run(prefix_caching: bool):
        config = EngineConfig(**exactness.SMALL_POOL, enable_prefix_caching=prefix_caching,
                              trace_path=str(tmp_path / f"trace_{prefix_caching}.jsonl"))
        engine = Engine(model, config, tokenizer=tok)
        submitted, add = [], engine.add_request
        engine.add_request = lambda p, *a, **k: submitted.append(list(p)) or add(p, *a, **k)
        for f in fillers:
            add(f, SamplingParams(max_tokens=60, seed=3, ignore_eos=True))
        loop = rl.MultiTurn(engine, max_turns=6, max_tokens=exactness.SMALL_POOL_TOKENS)
        trajs = [loop.add(p, tool if i % 2 else env, sp)
                 for i, (p, sp) in enumerate(zip(prompts, params))]  # fmt: skip
        while loop.num_unfinished:
            loop.step()
        while engine.has_unfinished_requests():
            loop.step()
        assert len(loop.other_outputs) == len(fillers)
        engine.check_invariants()
        return engine, trajs, submitted

    (engine, trajs, submitted), (engine_off, trajs_off, _) = run(True), run(False)
    on, off = engine.stats, engine_off.stats
    assert on["preemptions"] + off["preemptions"] > 0 and off["prefix_cache_hit_tokens"] == 0
    assert sorted(len(t.model_turns) for t in trajs) == [2, 2, 3, 4, 5, 6]
    reasons = {m.stop_reason for t in trajs for m in t.model_turns}
    assert {"7", 5, None} <= reasons, reasons
    for t, t_off in zip(trajs, trajs_off):
        assert t.status in ("done", "max_turns") and t.tokens == t_off.tokens
        assert np.array_equal(exactness.bits(t.logprobs), exactness.bits(t_off.logprobs))
        assert not any(turn.cached_tokens for turn in t_off.model_turns)  # recomputed
        for k in range(len(t.model_turns)):  # turn k's prompt: exactly the tokens before it
            before = [x for turn in t.turns[: 2 * k] for x in turn.token_ids]
            assert t.prompt_token_ids + before in submitted
    assert sum(m.cached_tokens for t in trajs for m in t.model_turns[1:]) > 0  # cache hits
    engine.close()
    trace = diagnostics.read_trace(tmp_path / "trace_True.jsonl")
    diagnostics.validate_trace(trace)
    assert diagnostics.summarize_trace(trace)["cached_tokens"] == on["prefix_cache_hit_tokens"]
    drift = [m.token_ids for t in trajs for m in t.model_turns
             if tok.encode(tok.decode(m.token_ids)) != m.token_ids]  # fmt: skip
    assert drift, "decode-then-encode gave back every model turn's ids: the check proves nothing"
    assert exactness.trainer_bits_match(model, engine.numerics, trajs)


@pytest.mark.slow
def test_fuzzer_finds_no_mismatch():
    """A fixed (derandomized) set of drawn workloads; `python -m tests.fuzz_exactness` runs more."""
    from tests import fuzz_exactness

    fuzz_exactness.fuzz(max_examples=4)
