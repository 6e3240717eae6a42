"""The multi-turn loop (`rl.multi_turn`, `rl.MultiTurn`) and its pieces, beyond exactness (which
tests/test_exactness.py holds: trajectories scored in one row, cache on and off, preemption):

  * whatever goes wrong in one trajectory ends that one only, with its status and a reason, and
    leaves no page held: an environment that raises (sync or async), returns text, floats, ids
    outside the vocabulary or nothing, tokens past the budget; a model turn that reaches the
    budget; the last allowed turn;
  * weight updates in flight: `keep` records each token's version and the next turn reads no KV
    of the older weights; `abort` ends the trajectories in flight as 'aborted';
  * `rl.ChatTemplate` glue against the chat template's own rendering of the conversation;
  * `rl.pack` of trajectories against a plain-numpy layout;
  * bad arguments are refused before anything is queued;
  * (slow) `diagnostics.parity_report` and the runtime parity guard over trajectories.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from jengine import Engine, EngineConfig, SamplingParams, diagnostics, rl
from jengine.rl.trajectory import Trajectory, Turn
from tests import exactness
from tests.conftest import same_bits

PARAMS = SamplingParams(temperature=0.9, max_tokens=6, ignore_eos=True)


def _engine(model, tokenizer=None, **changes) -> Engine:
    return Engine(model, EngineConfig(**{**exactness.SMALL_POOL, **changes}), tokenizer=tokenizer)


def _ids(n: int, seed: int) -> list[int]:
    return list(map(int, np.random.default_rng(seed).integers(2, 500, n)))


def test_a_bad_environment_ends_its_trajectory_only(tiny_model):
    engine = _engine(tiny_model)

    def raises(traj):
        raise RuntimeError("tool crashed")

    async def raises_async(traj):
        raise KeyError("no such tool")

    def good(traj):  # two environment turns, then the end
        return _ids(3, len(traj.turns)) if len(traj.model_turns) < 3 else None

    async def good_async(traj):
        await asyncio.sleep(0.01)
        return np.asarray(_ids(4, 9)) if len(traj.model_turns) < 2 else None

    envs = {
        "raises": (raises, "env_error", "tool crashed"),
        "raises_async": (raises_async, "env_error", "no such tool"),
        "text": (lambda t: "42", "env_error", "list of ints"),
        "floats": (lambda t: [1.5], "env_error", "1.5"),
        "outside_vocab": (lambda t: [512], "env_error", "512"),
        "empty": (lambda t: [], "env_error", "empty"),
        "past_budget": (lambda t: _ids(200, 1), "budget", "200 tokens"),
        "good": (good, "done", None),
        "good_async": (good_async, "done", None),
        "never_ends": (lambda t: _ids(2, 3), "max_turns", None),
    }
    names = list(envs)
    prompts = [_ids(5 + i, i) for i in range(len(names))]
    trajs = rl.multi_turn(engine, [envs[n][0] for n in names], prompts, PARAMS, max_turns=4,
                          max_tokens=120, meta=names)  # fmt: skip
    long = rl.multi_turn(engine, envs["never_ends"][0], [_ids(5, 0)], PARAMS, max_turns=99,
                         max_tokens=40)  # fmt: skip
    for t, name in zip(trajs + long, names + ["reaches_budget"]):
        status, why = envs[name][1:] if name in envs else ("length", "40-token budget")
        assert t.meta in (name, None) and t.status == status, (name, t.status, t.error)
        assert why is None or why in t.error, (name, t.error)
        assert t.prompt_token_ids == prompts[names.index(name)] if name in envs else True
    assert [len(t.model_turns) for t in trajs[-3:]] == [3, 2, 4]
    assert trajs[-3].turns[-1].role == "model" and len(long[0].tokens) == 40
    engine.check_invariants()
    stats = engine.stats
    assert stats["num_pages_free"] == stats["num_pages"] and not stats["running"]


def test_weight_updates_in_flight(tiny_model):
    """`keep`: the turn in flight continues, its later tokens carry the new version, and the next
    turn's prompt misses the cache (its keys carry the version); `abort`: every trajectory in
    flight ends 'aborted' with its partial turn, and no page stays held."""
    engine = _engine(tiny_model)
    loop = rl.MultiTurn(engine, max_turns=3)
    env = lambda t: _ids(3, len(t.turns))  # noqa: E731
    trajs = [loop.add(_ids(20, i), env, PARAMS) for i in range(3)]
    for _ in range(3):
        loop.step()
    engine.update_weights(tiny_model.params, mode="keep")
    while loop.num_unfinished:
        loop.step()
    for t in trajs:
        versions = t.policy_versions[t.loss_mask]
        assert t.status == "max_turns" and list(versions) == sorted(versions)
        assert versions[0] == 0 and versions[-1] == 1
        first_after = next(m for m in t.model_turns if m.policy_versions[0] == 1)
        assert first_after.cached_tokens == 0
    trajs = [loop.add(_ids(20, i), env, PARAMS) for i in range(3)]
    loop.step()
    engine.update_weights(tiny_model.params, mode="abort")
    while loop.num_unfinished:
        loop.step()
    assert [t.status for t in trajs] == ["aborted"] * 3
    engine.check_invariants()
    assert engine.stats["num_pages_free"] == engine.stats["num_pages"]


def test_chat_template_glue_is_the_templates_own_rendering(tiny_tokenizer):
    """prompt + model turn + `env` ids decode to the template's rendering of the whole
    conversation: after a turn the model ended with its EOS (`<|im_end|>`, the template's end of
    a turn) only the rest of the glue is added; after one a stop string ended, all of it."""
    tok, chat = tiny_tokenizer, rl.ChatTemplate(tiny_tokenizer)
    user = [{"role": "user", "content": "What is 3 + 4?"}]
    tool = [{"role": "tool", "content": "7"}]
    answer = tok.encode("<calc>3+4</calc>")
    for model_ids in (answer + [tok.eos_token_ids[0]], answer):
        ids = chat.prompt(user) + model_ids + chat.env(tool, after=model_ids)
        want = tok.apply_chat_template(user + [{"role": "assistant", "content": tok.decode(answer)}]
                                       + tool, add_generation_prompt=True)  # fmt: skip
        assert tok.decode(ids, skip_special_tokens=False) == want
    # the glue differs by the EOS: after a stop string, it closes the turn itself
    assert chat.env(tool, after=answer) == [1] + chat.env(tool, after=answer + [1])


def test_pack_lays_out_trajectories_for_the_trainer():
    """Column t of every [B, L - 1] array is token t + 1 (`token_logprobs`' alignment)."""
    lp = lambda *v: np.asarray(v, np.float32)  # noqa: E731
    vs = lambda *v: np.asarray(v, np.int32)  # noqa: E731
    a = Trajectory([5, 6], PARAMS, [Turn("model", [7, 8], lp(-1, -2), vs(0, 0)), Turn("env", [9]),
                                    Turn("model", [10], lp(-3), vs(1))])  # fmt: skip
    b = Trajectory([4], PARAMS, [Turn("model", [3], lp(-4), vs(2))])
    got = rl.pack([a, b], length=7, pad_id=0)
    assert got["tokens"].tolist() == [[5, 6, 7, 8, 9, 10, 0], [4, 3, 0, 0, 0, 0, 0]]
    assert got["prompt_lens"].tolist() == [2, 1] and got["completion_lens"].tolist() == [4, 1]
    assert got["loss_mask"].tolist() == [[0, 1, 1, 0, 1, 0], [1, 0, 0, 0, 0, 0]]
    assert same_bits(got["logprobs"], [[0, -1, -2, 0, -3, 0], [-4, 0, 0, 0, 0, 0]])
    assert got["versions"].tolist() == [[-1, 0, 0, -1, 1, -1], [2, -1, -1, -1, -1, -1]]
    with pytest.raises(ValueError, match="length=5"):
        rl.pack([a], length=5)


@pytest.mark.parametrize("call, error, match", [
    (lambda e: rl.multi_turn(e, "not callable", [[3]], PARAMS), TypeError, "env="),
    (lambda e: rl.multi_turn(e, [len, len], [[3]], PARAMS), ValueError, "1 prompts but 2 envs"),
    (lambda e: rl.multi_turn(e, len, [[3], [3] * 30], PARAMS, max_tokens=20), ValueError,
     r"prompts\[1\].*max_tokens=20"),
    (lambda e: rl.multi_turn(e, len, [[3]], {"max_tokens": 2}), TypeError, "sampling_params"),
    (lambda e: rl.multi_turn(e, len, [[3, 9999]], PARAMS), ValueError, "9999"),
    (lambda e: rl.multi_turn(e, len, [[3]], PARAMS, max_turns=0), ValueError, "max_turns"),
])  # fmt: skip
def test_bad_arguments_are_refused_before_anything_is_queued(tiny_model, call, error, match):
    engine = _engine(tiny_model)
    with pytest.raises(error, match=match):
        call(engine)
    assert not engine.has_unfinished_requests()


@pytest.mark.slow
def test_parity_report_and_guard_cover_trajectories(tiny_model, tiny_tokenizer):
    """`parity_report` scores each trajectory as one row and compares its model tokens; the
    runtime parity guard re-scores every turn (a request whose prompt holds the earlier turns)."""
    engine = _engine(tiny_model, tiny_tokenizer, verify_fraction=1.0, verify_strict=True)
    chat = rl.ChatTemplate(tiny_tokenizer)

    def env(traj):
        return chat.env([{"role": "tool", "content": "ok"}], after=traj.turns[-1].token_ids)

    prompts = [chat.prompt([{"role": "user", "content": f"{i} + {i}?"}]) for i in range(4)]
    trajs = rl.multi_turn(engine, env, prompts, PARAMS, max_turns=3)
    report = diagnostics.parity_report(engine.model, trajs, None, None, numerics=engine.numerics)
    n = sum(t.num_model_tokens for t in trajs)
    assert report["bitwise_equal"] == report["num_tokens"] == n and report["max_abs_diff"] == 0.0
    stats = engine.stats
    assert stats["verified_requests"] == 12 and stats["verify_mismatches"] == 0
