"""jengine.rl: differentiable trainer logprobs that are bitwise the rollout's, mismatch metrics,
corrections, GRPO/GSPO losses, and the runnable example.

What is proved here:
  * `rl.token_logprobs` forward == the engine's rollout logprobs, bitwise, for every completion
    token (fp32; temperature, top-k, top-p, min-p per sequence; ragged prompt/completion lengths;
    eagerly, under jit, and as the aux output of jit(value_and_grad)); 0 outside the mask;
  * the same under raw_logprobs with a bf16 lm_head (against `jengine.score`, the engine's step);
  * its gradient equals jax.grad of the plain-XLA reference (numerics="fast") to tolerance;
  * metrics, corrections and losses equal hand-computed numpy values;
  * the example's reward rises over a short run and its on-policy ratio is exactly 1.0.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jengine
from jengine import EngineConfig, Model, Numerics, SamplingParams, init_params, rl
from jengine.engine import Engine
from jengine.examples import rl_toy

CFG = rl_toy.MODEL  # vocab 16, 2 layers: compiles and runs fast
ENGINE = dict(max_model_len=24, max_num_seqs=8, max_num_batched_tokens=64, page_size=4)
SAMPLING = [
    SamplingParams(temperature=1.0, max_tokens=7, seed=1, ignore_eos=True),
    SamplingParams(temperature=0.7, top_k=5, max_tokens=4, seed=2, ignore_eos=True),
    SamplingParams(temperature=0.9, top_p=0.8, max_tokens=9, seed=3, ignore_eos=True),
    SamplingParams(
        temperature=1.2, min_p=0.1, max_tokens=6, seed=4, ignore_eos=True, stop_token_ids=(3,)
    ),
    SamplingParams(
        temperature=0.6, top_k=8, top_p=0.9, min_p=0.05, max_tokens=8, seed=5, ignore_eos=True
    ),
    SamplingParams(temperature=0.0, max_tokens=5, seed=6, ignore_eos=True),
]


@pytest.fixture(scope="module")
def model():
    return Model(CFG, init_params(CFG, seed=3))


def _rollout(model, **cfg):
    rng = np.random.default_rng(0)
    prompts = [
        list(map(int, rng.integers(0, CFG.vocab_size, rng.integers(1, 9)))) for _ in SAMPLING
    ]
    outs = Engine(model, EngineConfig(**{**ENGINE, **cfg})).generate(prompts, SAMPLING)
    packed = rl.pack(
        prompts, [o.token_ids for o in outs], rollout_logprobs=[o.logprobs for o in outs]
    )
    packed["mask"] = np.asarray(
        rl.completion_mask(
            packed["prompt_lens"], packed["completion_lens"], packed["tokens"].shape[1]
        )
    )
    return packed


@pytest.fixture(scope="module")
def rollout(model):
    return _rollout(model)


def _bits(x):
    return np.asarray(x, np.float32).view(np.uint32)


def test_forward_is_the_rollout_bitwise(model, rollout):
    r = rollout
    assert r["mask"].sum() == r["completion_lens"].sum() > 20
    lp = np.asarray(
        rl.token_logprobs(
            model.params,
            CFG,
            r["tokens"],
            r["prompt_lens"],
            r["completion_lens"],
            sampling_params=SAMPLING,
        )
    )
    assert lp.shape == (len(SAMPLING), r["tokens"].shape[1] - 1)
    assert np.array_equal(_bits(lp[r["mask"]]), _bits(r["logprobs"][r["mask"]]))
    assert np.all(lp[~r["mask"]] == 0.0)
    m = rl.to_host(rl.mismatch_metrics(lp, r["logprobs"], r["mask"]))
    assert m["bitwise_equal"] == m["num_tokens"] and m["max_abs_diff"] == 0.0 and m["k3"] == 0.0


def test_under_jit_and_grad_bitwise_and_gradient_matches_reference(model, rollout):
    r = rollout
    weights = jnp.asarray(np.random.default_rng(1).normal(size=r["mask"].shape), jnp.float32)
    arrays = dict(
        temperature=np.asarray([s.temperature for s in SAMPLING], np.float32),
        top_k=np.asarray([s.top_k for s in SAMPLING], np.int32),
        top_p=np.asarray([s.top_p for s in SAMPLING], np.float32),
        min_p=np.asarray([s.min_p for s in SAMPLING], np.float32),
    )

    def objective(params, numerics, remat=True):
        lp = rl.token_logprobs(
            params,
            CFG,
            r["tokens"],
            r["prompt_lens"],
            r["completion_lens"],
            numerics=numerics,
            remat=remat,
            **arrays,
        )  # per-sequence arrays, not SamplingParams
        return jnp.sum(lp * weights), lp

    (_, lp), grads = jax.jit(
        jax.value_and_grad(lambda p: objective(p, Numerics()), has_aux=True)
    )(model.params)
    assert np.array_equal(_bits(np.asarray(lp)[r["mask"]]), _bits(r["logprobs"][r["mask"]]))
    # the reference: plain XLA ops differentiated by jax end to end (no remat, no chunked head)
    ref = jax.jit(jax.grad(lambda p: objective(p, Numerics(mode="fast"), remat=False)[0]))(
        model.params)  # fmt: skip
    flat, _ = jax.tree_util.tree_flatten_with_path(grads)
    for (path, g), g_ref in zip(flat, jax.tree_util.tree_leaves(ref)):
        g, g_ref = np.asarray(g), np.asarray(g_ref)
        scale = np.abs(g_ref).max()
        assert scale > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(
            g, g_ref, rtol=0, atol=1e-4 * scale, err_msg=jax.tree_util.keystr(path)
        )


def test_raw_logprobs_with_bf16_head_match_the_engine_function(model, rollout):
    """Other settings, same bits: compared with `jengine.score` (the engine's own compiled step,
    bitwise the rollout for every mode and head dtype: tests/test_engine.py)."""
    r = rollout
    settings = dict(logprobs_mode="raw_logprobs", numerics=Numerics(lm_head_dtype="bfloat16"))
    prompts = [t[:p].tolist() for t, p in zip(r["tokens"], r["prompt_lens"])]
    completions = [t[p : p + c].tolist() for t, p, c in zip(r["tokens"], r["prompt_lens"], r["completion_lens"])]
    want = np.concatenate(jengine.score(model, prompts, completions, SAMPLING, **settings))
    lp = rl.token_logprobs(model.params, CFG, r["tokens"], r["prompt_lens"], r["completion_lens"],
                           sampling_params=SAMPLING, **settings)
    assert np.array_equal(_bits(np.asarray(lp)[r["mask"]]), _bits(want))
    assert int(rl.bitwise_equal(lp, r["logprobs"], r["mask"])) < r["mask"].sum()  # != processed fp32


def test_pack_and_mask_alignment():
    packed = rl.pack(
        [[5, 6], [7]], [[1, 2, 3], [4]], length=6, rollout_logprobs=[[-1, -2, -3], [-4]]
    )
    assert packed["tokens"].tolist() == [[5, 6, 1, 2, 3, 0], [7, 4, 0, 0, 0, 0]]
    mask = np.asarray(rl.completion_mask(packed["prompt_lens"], packed["completion_lens"], 6))
    assert mask.tolist() == [[False, True, True, True, False], [True, False, False, False, False]]
    assert packed["logprobs"][mask].tolist() == [-1, -2, -3, -4]
    with pytest.raises(ValueError, match="length"):
        rl.pack([[1, 2]], [[3]], length=2)


NEW = np.array([[-1.0, -0.5, -2.0, 0.0], [-0.1, -3.0, -1.0, -0.7]], np.float32)
OLD = np.array([[-1.0, -0.9, -1.5, -9.0], [-0.4, -3.0, -1.2, -0.1]], np.float32)
MASK = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)


def test_metrics_match_numpy():
    m = rl.to_host(rl.mismatch_metrics(NEW, OLD, MASK, eps_low=0.2, eps_high=0.3))
    r = (NEW - OLD)[MASK].astype(np.float64)
    w = np.exp(r)
    expect = {
        "ratio_mean": w.mean(),
        "ratio_max": w.max(),
        "clip_frac_low": np.mean(w < 0.8),
        "clip_frac_high": np.mean(w > 1.3),
        "clip_frac": np.mean((w < 0.8) | (w > 1.3)),
        "k1": np.mean(-r),
        "k3": np.mean(w - r - 1),
        "mean_abs_log_ratio": np.mean(np.abs(r)),
        "max_abs_diff": np.abs(r).max(),
        "ess": w.sum() ** 2 / (w * w).sum(),
        "ess_frac": w.sum() ** 2 / (w * w).sum() / len(r),
    }
    for k, v in expect.items():
        assert m[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    assert m["num_tokens"] == 7
    assert m["bitwise_equal"] == 2  # (-1, -1) and (-3, -3); the masked-out pair does not count
    assert int(rl.bitwise_equal(np.float32(0.0), np.float32(-0.0))) == 0  # bits, not ==


def test_corrections_match_numpy():
    r = np.where(MASK, NEW - OLD, 0.0).astype(np.float64)
    w = np.exp(r)
    tis = np.asarray(rl.truncated_is(NEW, OLD, MASK, cap=1.2))
    np.testing.assert_allclose(tis, np.where(MASK, np.minimum(w, 1.2), 0), rtol=1e-6)
    mis = np.asarray(rl.masked_is(NEW, OLD, MASK, lo=0.7, hi=1.4))
    np.testing.assert_allclose(mis, np.where(MASK & (w >= 0.7) & (w <= 1.4), w, 0), rtol=1e-6)
    mis01 = np.asarray(rl.masked_is(NEW, OLD, MASK, lo=0.7, hi=1.4, keep_ratio=False))
    assert mis01.tolist() == np.where(MASK & (w >= 0.7) & (w <= 1.4), 1.0, 0.0).tolist()
    seq = r.sum(-1) / MASK.sum(-1)
    np.testing.assert_allclose(
        np.asarray(rl.sequence_ratios(NEW, OLD, MASK)), np.exp(seq), rtol=1e-6
    )
    np.testing.assert_allclose(np.asarray(rl.token_ratios(NEW, OLD, MASK)), w, rtol=1e-6)
    seq_tis = np.asarray(rl.truncated_is(NEW, OLD, MASK, cap=1.0, level="sequence"))
    np.testing.assert_allclose(
        seq_tis, np.where(MASK, np.minimum(np.exp(seq), 1.0)[:, None], 0), rtol=1e-6
    )
    with pytest.raises(ValueError, match="level"):
        rl.truncated_is(NEW, OLD, MASK, level="geometric")


def test_losses_match_numpy():
    rewards = np.array([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]], np.float32)
    adv = np.asarray(rl.group_advantages(rewards, eps=1e-6))
    expect = (rewards - rewards.mean(-1, keepdims=True)) / (rewards.std(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(adv, expect, rtol=1e-6)
    assert np.all(adv[1] == 0)

    a = np.array([1.0, -2.0], np.float32)
    loss, aux = rl.grpo_loss(jnp.asarray(NEW), OLD, a, MASK, eps_low=0.2, eps_high=0.3)
    ratio = np.exp(np.where(MASK, NEW - OLD, 0.0).astype(np.float64))
    obj = np.minimum(ratio * a[:, None], np.clip(ratio, 0.8, 1.3) * a[:, None])
    assert float(loss) == pytest.approx(-(obj * MASK).sum() / MASK.sum(), rel=1e-5)
    clipped = ((a[:, None] > 0) & (ratio > 1.3)) | ((a[:, None] < 0) & (ratio < 0.8))
    assert float(aux["clipped"]) == pytest.approx((clipped & MASK).sum() / MASK.sum())
    # at ratio 1 the gradient is -A * mask / n per token
    g = jax.grad(lambda lp: rl.grpo_loss(lp, OLD, a, MASK)[0])(jnp.asarray(OLD))
    np.testing.assert_allclose(np.asarray(g), -a[:, None] * MASK / MASK.sum(), rtol=1e-6)

    loss, aux = rl.gspo_loss(jnp.asarray(NEW), OLD, a, MASK, eps_low=0.1, eps_high=0.1)
    s = np.exp((np.where(MASK, NEW - OLD, 0.0)).sum(-1) / MASK.sum(-1))
    obj = np.minimum(s * a, np.clip(s, 0.9, 1.1) * a)
    assert float(loss) == pytest.approx(-obj.mean(), rel=1e-5)
    np.testing.assert_allclose(np.asarray(aux["ratio"]), s, rtol=1e-6)
    lw, _ = rl.gspo_loss(
        jnp.asarray(NEW), OLD, a, MASK, eps_low=0.1, eps_high=0.1, length_weighted=True
    )
    n = MASK.sum(-1)
    assert float(lw) == pytest.approx(-(obj * n).sum() / n.sum(), rel=1e-5)


def test_example_reward_rises_and_on_policy_ratio_is_exactly_one():
    history = rl_toy.run(rl_toy.RunConfig(steps=30, seed=0), log=lambda s: None)
    for h in history:  # run() also asserts this for the default variant
        assert h["onpolicy_bitwise_equal"] == h["onpolicy_tokens"] > 0
        assert h["onpolicy_ratio_mean"] == 1.0 and h["onpolicy_ratio_max"] == 1.0
        assert h["onpolicy_max_abs_diff"] == 0.0 and h["onpolicy_k3"] == 0.0
    first = np.mean([h["reward"] for h in history[:5]])
    last = np.mean([h["reward"] for h in history[-5:]])
    assert last > first + 0.1, (first, last)
    assert history[-1]["policy_version"] == len(history) - 1  # one update_weights per step
