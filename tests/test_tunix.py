"""jengine inside Tunix (`jengine.integrations.tunix`), in Tunix's own GRPO loop.

What is proved here:
  * mapping: a Tunix Qwen3 (tied and untied, dense and MoE: 8 experts, top-2) / Llama3 state ->
    jengine params -> logits equal the Tunix model's own logits within 1e-4 (fp32); jengine
    params -> Tunix state is the original state bit for bit; unmappable models (Gemma3, anything
    else) are refused with an error naming the class;
  * a Tunix Qwen3-MoE served by JengineRollout: rollout logprobs == `get_per_token_logps` ==
    `JengineActor.per_token_logps` bitwise;
  * the rollout interface: RolloutConfig -> SamplingParams, Tunix-style prompt padding,
    `get_per_token_logps` == `jengine.score` == the rollout's logprobs, bitwise;
    `JengineActor.per_token_logps` (the trainer side) == the rollout's logprobs, bitwise, with
    finite gradients; the registered GRPO loss equals Tunix's own on the same actor;
  * a bad or unmappable state (wrong shape, missing or unexpected leaf, NaN, LoRA) is refused by
    `update_params` before anything changes; a good one raises the policy version;
  * Tunix's `GRPOLearner` (num_iterations=2) with `rollout_engine=JengineRollout`: training runs,
    rewards and losses are finite, every step's rollout logprobs equal the actor's bit for bit,
    Tunix's loss reports an exactly-1 ratio for every step's first update, and the policy version
    rises by one per step; the same run with Tunix's vanilla engine reports its mismatch.

google-tunix pins transformers below what the main suite needs, so it lives in its own
environment: without `tunix` importable here, `test_tunix_environment` runs this file with the
interpreter named by JENGINE_TUNIX_PYTHON (or skips, naming the variable).
"""

import os
import subprocess
import sys

import numpy as np
import pytest

try:
    import tunix  # noqa: F401

    HAVE_TUNIX = True
except ImportError:
    HAVE_TUNIX = False

ENV_VAR = "JENGINE_TUNIX_PYTHON"


def in_tunix_env(test):
    """Collects `test` only where tunix is importable; elsewhere test_tunix_environment runs it."""
    return test if HAVE_TUNIX else None


@pytest.mark.skipif(HAVE_TUNIX, reason="tunix is importable: the tests below run directly")
@pytest.mark.slow  # both halves: a subprocess in another environment
@pytest.mark.parametrize("tier", ["not slow", "slow"])
def test_tunix_environment(tier):
    """This file's tests of one tier (tests/conftest.py's SLOW) in the Tunix environment."""
    python = os.environ.get(ENV_VAR)
    if not python:
        pytest.skip(f"google-tunix is not installed here; set {ENV_VAR} to a Python that has "
                    "`pip install -e '.[tunix]'` to run tests/test_tunix.py")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", tier,
         os.path.abspath(__file__)],
        cwd=root, capture_output=True, text=True, timeout=900, check=False,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    sys.stdout.write(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


def bits(x):
    return np.asarray(x, np.float32).view(np.uint32)


# -- fixtures (import Tunix lazily: this module is collected in environments without it) ---------


@pytest.fixture(scope="module")
def jt():
    from jengine.integrations import tunix as jt

    return jt


@pytest.fixture(scope="module")
def example(jt):
    from jengine.examples import tunix_grpo

    return tunix_grpo


def _randomize(build, seed):
    """build() -> a Tunix model, created from shapes only and filled with random weights."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(nnx.eval_shape(build))
    rng = np.random.default_rng(seed)

    def draw(x):
        noise = rng.standard_normal(x.shape).astype(np.float32)
        return jnp.asarray(1.0 + 0.1 * noise if x.ndim == 1 else 0.3 * noise)

    return nnx.merge(graphdef, jax.tree.map(draw, state))


def _tunix_model(family, seed=0, tied=True, vocab_size=40):
    from flax import nnx

    if family.startswith("qwen3"):
        from tunix.models.qwen3 import model as m

        moe = {"num_experts": 8, "num_experts_per_tok": 2} if family == "qwen3_moe" else {}
        cfg = m.ModelConfig(num_layers=2, vocab_size=vocab_size, embed_dim=32, hidden_dim=48,
                            num_heads=4, head_dim=8, num_kv_heads=2, rope_theta=1_000_000,
                            norm_eps=1e-6, use_tied_embedding=tied, **moe)
        return _randomize(lambda: m.Qwen3(cfg, rngs=nnx.Rngs(seed)), seed)
    from tunix.models.llama3 import model as m

    cfg = m.ModelConfig(num_layers=2, vocab_size=40, embed_dim=32, hidden_dim=48, num_heads=4,
                        head_dim=8, num_kv_heads=2, rope_theta=500_000, norm_eps=1e-5,
                        weight_tying=tied)
    return _randomize(lambda: m.Llama3(cfg, rngs=nnx.Rngs(seed)), seed)


def _padded_batch(vocab, seed=0):
    """Tunix's layout: left-padded prompts, right-padded completions (pad id 0)."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(3, vocab, (3, 6)).astype(np.int32)
    comp = rng.integers(3, vocab, (3, 5)).astype(np.int32)
    prompt[0, :2] = 0
    prompt[2, :4] = 0
    comp[1, 3:] = 0
    return prompt, comp


def _serve(jt, example, actor, rc):
    """A JengineRollout serving `actor` with the example's character tokenizer."""
    from jengine.config import EngineConfig

    return jt.JengineRollout(rollout_actor=actor, tokenizer=example.CharTokenizer(), mesh=None,
                             rollout_config=rc,
                             engine_config=EngineConfig(max_num_seqs=8, max_num_batched_tokens=64))


@pytest.fixture(scope="module")
def setup(jt, example):
    """A tiny Tunix Qwen3, its JengineActor and a JengineRollout serving it."""
    from tunix.rl.rollout import base_rollout

    model = example.tiny_qwen3(seed=1, vocab_size=64)
    rc = base_rollout.RolloutConfig(max_tokens_to_generate=6, temperature=0.8, top_p=0.9,
                                    top_k=10, max_prompt_length=8, kv_cache_size=32,
                                    return_logprobs=True, seed=3)
    actor = jt.JengineActor(model, rc)
    return {"model": model, "rc": rc, "actor": actor, "rollout": _serve(jt, example, actor, rc)}


def _completions(out, width, pad=0):
    return np.stack([np.pad(t, (0, width - len(t)), constant_values=pad) for t in out.tokens])


# -- mapping ---------------------------------------------------------------------------------------


@in_tunix_env
@pytest.mark.parametrize("family,tied", [("qwen3", True), ("qwen3", False), ("llama3", False),
                                         ("qwen3_moe", True)])
def test_mapping_logits_match_tunix_model(jt, family, tied):
    import jax.numpy as jnp
    from flax import nnx
    from tunix.rl import common

    model = _tunix_model(family, tied=tied)
    cfg = jt.jengine_config(model)
    assert cfg.qk_norm == family.startswith("qwen3") and cfg.tie_word_embeddings == tied
    assert (cfg.num_experts, cfg.num_experts_per_tok) == ((8, 2) if "moe" in family else (0, 0))
    prompt, comp = _padded_batch(cfg.vocab_size)
    tokens = jnp.asarray(np.concatenate([prompt, comp], 1))
    real = tokens != 0
    mask = common.make_causal_attn_mask(real)
    positions = common.build_positions_from_mask(real)
    want, _ = nnx.jit(lambda m: m(tokens, positions, None, mask))(model)
    got, _ = nnx.jit(lambda m: m(tokens, None, None, mask))(jt.JengineActor(model))
    diff = np.abs(np.asarray(want) - np.asarray(got))[np.asarray(real)]
    print(f"{family} tied={tied}: max |dlogit| {diff.max():.2e} (logit scale "
          f"{np.abs(np.asarray(want)).max():.1f})")
    assert diff.max() <= 1e-4
    # jengine params -> Tunix state is the original state, bit for bit
    state = jt._flat(nnx.state(model, nnx.Param))
    back = jt._flat(jt.to_tunix_state(jt.to_jengine_params(nnx.state(model, nnx.Param), cfg), cfg))
    assert back.keys() == state.keys()
    for path, x in state.items():
        assert np.array_equal(bits(back[path]), bits(x)), path


@in_tunix_env
def test_unmappable_models_are_named(jt):
    from flax import nnx
    from tunix.models.gemma3 import model as gemma3
    from tunix.models.qwen3 import model as qwen3

    # shapes only: the mapping refuses them from their class and config
    gemma = nnx.eval_shape(lambda: gemma3.Gemma3(gemma3.ModelConfig(
        num_layers=1, num_embed=32, embed_dim=16, hidden_dim=32, num_heads=2, head_dim=8,
        num_kv_heads=1, sliding_window_size=8), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="tunix.models.gemma3.model.Gemma3"):
        jt.JengineActor(gemma)
    with pytest.raises(ValueError, match="flax.nnx.nn.linear.Linear"):
        jt.jengine_config(nnx.eval_shape(lambda: nnx.Linear(2, 2, rngs=nnx.Rngs(0))))
    # an MoE state whose experts have the wrong width is refused leaf by leaf
    moe = nnx.eval_shape(lambda: qwen3.Qwen3(qwen3.ModelConfig(
        num_layers=1, vocab_size=16, embed_dim=8, hidden_dim=8, num_heads=2, head_dim=4,
        num_kv_heads=1, rope_theta=1_000_000, norm_eps=1e-6, num_experts=2,
        num_experts_per_tok=1), rngs=nnx.Rngs(0)))
    cfg = jt.jengine_config(moe).replace(moe_intermediate_size=6)
    with pytest.raises(ValueError, match=r"layers.0.mlp.gate_proj has shape \(2, 8, 8\), "
                                         r"expected \(2, 8, 6\)"):
        jt.check_tunix_state(nnx.state(moe, nnx.Param), cfg)


# -- the rollout interface -------------------------------------------------------------------------


@in_tunix_env
def test_sampling_and_seed_mapping(jt):
    import dataclasses

    import jax
    from tunix.rl.rollout import base_rollout

    rc = base_rollout.RolloutConfig(temperature=0.0, top_p=None, top_k=-1, max_tokens_to_generate=5)
    sp = jt.sampling_params(rc, eos_ids=[2])
    got = (sp.temperature, sp.top_k, sp.top_p, sp.max_tokens, sp.stop_token_ids)
    assert got == (0.0, 0, 1.0, 5, (2,))
    sp = jt.sampling_params(dataclasses.replace(rc, temperature=0.7, top_p=0.5, top_k=4,
                                                eos_tokens=[5, 6]), eos_ids=[2])
    assert (sp.temperature, sp.top_k, sp.top_p, sp.stop_token_ids) == (0.7, 4, 0.5, (5, 6))
    assert jt.request_seeds(None, 0, 3) == [None] * 3
    a = jt.request_seeds(7, 0, 4)
    assert a == jt.request_seeds(7, 0, 4) and a != jt.request_seeds(7, 1, 4) and len(set(a)) == 4
    assert jt.request_seeds(jax.random.PRNGKey(7), 0, 2) == jt.request_seeds(
        jax.random.key(7), 0, 2)


@pytest.fixture(scope="module")
def generated(setup):
    """One generate of the setup's rollout: (RolloutOutput, completions i32[B, max_tokens])."""
    out = setup["rollout"].generate(["abc", "hello", "x", "abcdefg"], setup["rc"])
    return out, _completions(out, setup["rc"].max_tokens_to_generate)


@in_tunix_env
def test_rollout_logprobs_are_score_and_actor_bits(jt, setup, generated):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jengine

    rollout, actor = setup["rollout"], setup["actor"]
    out, comp = generated
    pad = rollout.pad_id()
    # prompts tokenised with bos and left-padded to max_prompt_length
    lp = out.left_padded_prompt_tokens
    assert lp.shape == (4, 8) and list(lp[2]) == [pad] * 6 + [1, 3 + 23]
    assert all(len(t) == len(l) for t, l in zip(out.tokens, out.logprobs))
    assert out.text == [rollout._tokenizer.decode([x for x in t if x != 2]) for t in out.tokens]
    plain = [[int(x) for x in row if x != pad] for row in lp]
    scored = jengine.score(rollout.engine.model, plain, [list(map(int, t)) for t in out.tokens],
                           rollout._sampling)
    for reuse in (True, False):
        rollout.reuse_rollout_logprobs = reuse
        got = np.asarray(rollout.get_per_token_logps(lp, comp))
        for i, t in enumerate(out.tokens):
            assert np.array_equal(bits(got[i, : len(t)]), bits(out.logprobs[i]))
            assert np.array_equal(bits(scored[i]), bits(out.logprobs[i]))
            assert not got[i, len(t):].any()
    rollout.reuse_rollout_logprobs = True
    # the trainer side, as the loss computes it: inside jit(value_and_grad)
    def loss(model):
        v = model.per_token_logps(jnp.asarray(lp), jnp.asarray(comp), pad)
        return -v.sum(), v

    (_, in_grad), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(actor)
    n = 0
    for i, t in enumerate(out.tokens):
        assert np.array_equal(bits(np.asarray(in_grad)[i, : len(t)]), bits(out.logprobs[i]))
        n += len(t)
    leaves = jax.tree.leaves(nnx.to_pure_dict(grads))
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert any(np.abs(np.asarray(g)).max() > 0 for g in leaves)
    print(f"rollout == score == actor.per_token_logps on {n}/{n} tokens")
    with pytest.raises(ValueError, match="temperature=1.0"):
        actor.per_token_logps(jnp.asarray(lp), jnp.asarray(comp), pad, 1.0)


@in_tunix_env
def test_moe_rollout_logprobs_are_the_actors_bits(jt, example):
    """A Tunix Qwen3-MoE (8 experts, top-2) served by jengine: the rollout's logprobs are the
    scorer's and the trainer-side actor's, bit for bit."""
    import jax.numpy as jnp
    from tunix.rl.rollout import base_rollout

    rc = base_rollout.RolloutConfig(max_tokens_to_generate=6, temperature=0.9, top_k=12,
                                    max_prompt_length=8, kv_cache_size=32, return_logprobs=True,
                                    seed=5)
    actor = jt.JengineActor(_tunix_model("qwen3_moe", seed=2, vocab_size=64), rc)
    assert actor.jengine_config.num_experts == 8
    rollout = _serve(jt, example, actor, rc)
    out = rollout.generate(["abc", "hello", "x", "abcdefg"], rc)
    comp = _completions(out, rc.max_tokens_to_generate)
    lp = out.left_padded_prompt_tokens
    mine = np.asarray(actor.per_token_logps(jnp.asarray(lp), jnp.asarray(comp), rollout.pad_id()))
    rollout.reuse_rollout_logprobs = False
    scored = np.asarray(rollout.get_per_token_logps(lp, comp))
    n = 0
    for i, t in enumerate(out.tokens):
        assert len(t) > 0
        assert np.array_equal(bits(mine[i, : len(t)]), bits(out.logprobs[i]))
        assert np.array_equal(bits(scored[i, : len(t)]), bits(out.logprobs[i]))
        n += len(t)
    print(f"MoE rollout == score == actor.per_token_logps on {n}/{n} tokens")


@in_tunix_env
def test_registered_grpo_loss_is_tunixs_objective(jt, setup, generated):
    import jax.numpy as jnp
    from tunix.rl import algo_core, function_registry
    from tunix.rl.grpo import grpo_learner

    rollout, actor, rc = setup["rollout"], setup["actor"], setup["rc"]
    assert function_registry.get_policy_loss_fn("grpo") is jt.grpo_loss_fn
    out, comp = generated
    lp = out.left_padded_prompt_tokens
    example = grpo_learner.TrainExample(
        prompt_ids=jnp.asarray(lp), prompt_mask=jnp.asarray(lp != 0),
        completion_ids=jnp.asarray(comp), completion_mask=jnp.asarray(comp != 0),
        advantages=jnp.asarray([1.0, -0.5, 0.25, -0.75]),
        ref_per_token_logps=rollout.get_per_token_logps(lp, comp) - 0.01,
        old_per_token_logps=rollout.get_per_token_logps(lp, comp) + 0.02,
    )
    config = grpo_learner.GRPOConfig(num_generations=2, beta=0.04, epsilon=0.2)
    config.temperature = rc.temperature
    ours = jt.grpo_loss_fn(actor, example, config, 0, 2)
    tunix_own = algo_core.grpo_loss_fn(actor, example, config, 0, 2)  # Tunix's generic scoring
    assert abs(float(ours[0]) - float(tunix_own[0])) <= 1e-6
    assert ours[1].keys() == tunix_own[1].keys()
    for key in ours[1]:
        if key != "entropy":  # ours: of the processed (filtered) distribution
            assert abs(float(ours[1][key]) - float(tunix_own[1][key])) <= 1e-5, key
    # a non-jengine model goes to Tunix's own function
    model = setup["model"]
    assert float(jt.grpo_loss_fn(model, example, config, 0, 2)[0]) == float(
        algo_core.grpo_loss_fn(model, example, config, 0, 2)[0])


@in_tunix_env
def test_bad_states_are_refused_before_anything_changes(jt, setup):
    import jax.numpy as jnp
    from flax import nnx

    rollout, model = setup["rollout"], setup["model"]
    state = jt._flat(nnx.state(model, nnx.Param))
    before = [bits(x) for x in __import__("jax").tree.leaves(rollout.engine.model.params)]
    version = rollout.policy_version

    def nested(flat):
        out = {}
        for path, x in flat.items():
            node = out
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = x
        return out

    q = ("layers", 1, "attn", "q_proj", "w")
    wrong_shape = {**state, q: jnp.zeros((32, 4, 7))}
    missing = {k: v for k, v in state.items() if k != ("final_norm", "w")}
    extra = {**state, ("layers", 0, "attn", "q_proj", "lora_a"): jnp.zeros((32, 2))}
    nan = {**state, ("final_norm", "w"): state[("final_norm", "w")].at[3].set(jnp.nan)}
    cases = [(wrong_shape, "layers.1.attn.q_proj.w has shape"), (missing, "missing final_norm.w"),
             (extra, "unexpected layers.0.attn.q_proj.lora_a"), (nan, "final_norm.*non-finite")]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            rollout.update_params(nested(bad))
    with pytest.raises(ValueError, match="LoRA"):
        rollout.update_params(nested(state), (nnx.LoRAParam,))
    assert rollout.policy_version == version
    after = [bits(x) for x in __import__("jax").tree.leaves(rollout.engine.model.params)]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    # a good state (an nnx.State, as Tunix's sync_weights passes it) is served
    rollout.update_params(nnx.state(model, nnx.Param), (nnx.Param,))
    assert rollout.policy_version == version + 1
    served = jt._flat(nnx.state(rollout.model(), nnx.Param))
    assert all(np.array_equal(bits(served[p]), bits(x)) for p, x in state.items())


# -- Tunix's GRPO loop -----------------------------------------------------------------------------


@in_tunix_env
def test_grpo_learner_with_jengine_is_exactly_on_policy(example):
    result = example.run("jengine", steps=3)
    steps = result["steps"]
    assert len(steps) == 3
    for i, s in enumerate(steps):
        exact = s["exact"]
        assert exact["tokens"] > 0 and exact["bitwise_equal"] == exact["tokens"], (i, exact)
        assert s["policy_version"] == i  # one weight sync per step reached the engine
        assert np.isfinite(s["reward_mean"]) and np.all(np.isfinite(s["loss"]))
        # Tunix's loss: the first update of every step compares the trainer's logprobs with the
        # rollout's (old_per_token_logps) and finds them equal
        assert s["first_update/log_ratio/abs_mean"] == 0.0
        assert s["first_update/is_ratio/min"] == 1.0 and s["first_update/is_ratio/max"] == 1.0
    assert result["final_policy_version"] == 3
    rows = example.summary(result)
    print("jengine", rows, f"{result['seconds']:.1f} s")


@in_tunix_env
def test_grpo_learner_with_vanilla_reports_its_mismatch(example):
    result = example.run("vanilla", steps=2)
    row = example.summary(result)["generic"]
    assert row["tokens"] > 0 and np.isfinite(row["max_abs_diff"]) and np.isfinite(row["k3"])
    assert all(np.isfinite(s["reward_mean"]) and np.all(np.isfinite(s["loss"]))
               for s in result["steps"])
    print("vanilla", row, [s["first_update/log_ratio/abs_mean"] for s in result["steps"]],
          f"{result['seconds']:.1f} s")
