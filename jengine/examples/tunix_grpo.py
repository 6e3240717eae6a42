"""Tunix's own GRPO loop with jengine as the rollout engine, beside Tunix's vanilla engine (CPU).

    python -m jengine.examples.tunix_grpo --steps 4
    python -m jengine.examples.tunix_grpo --engines jengine --steps 20 --report_json /tmp/tunix.json

Needs `pip install "jengine[tunix]"`. The policy is a tiny random Tunix Qwen3 (Tunix's
`ModelConfig` with small sizes) over a character tokenizer; the reward is the fraction of
completion characters drawn from the prompts' alphabet (a-h). Each run is Tunix's `GRPOLearner`
with `num_iterations=2`, so Tunix asks the rollout for the old logprobs and its loss reports the
policy ratio of the first update of every step.

Per step (one `generate` of the learner) the run records the rollout's logprobs against Tunix's
trainer-side logprobs of the same tokens under the same weights:
  * jengine: `JengineActor.per_token_logps`, what the registered GRPO loss trains on (bitwise);
    and Tunix's generic `common.compute_per_token_logps` on the same actor (its own log-softmax);
  * vanilla: Tunix's sampler logprobs against `common.compute_per_token_logps` on the Tunix model;
plus, from Tunix's loss, `log_ratio/abs_mean` and `is_ratio/{min,max}` of each step's first
update (exactly 0 / 1 / 1 when the trainer's logprobs are the rollout's bits) and the policy
version the jengine engine serves (one weight sync per step). Vanilla's old logprobs come from its
`get_per_token_logps`, which scores at temperature 1 whatever the rollout's temperature, so its
first-update ratio is not 1 either.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tunix.models.qwen3 import model as qwen3
from tunix.rl import common
from tunix.rl import rl_cluster as rl_cluster_lib
from tunix.rl.grpo import grpo_learner
from tunix.rl.rollout import base_rollout, vanilla_rollout

from jengine.config import EngineConfig
from jengine.integrations.tunix import JengineActor, JengineRollout

CHARS = "abcdefghijklmnopqrstuvwxyz"
PAD, BOS, EOS = 0, 1, 2


class CharTokenizer:
    """ids 0 pad, 1 bos, 2 eos, then one id per lowercase letter (Tunix's tokenizer protocol)."""

    vocab_size = 3 + len(CHARS)

    def encode(self, text: str, **_: Any) -> list[int]:
        return [3 + CHARS.index(c) for c in text]

    def decode(self, ids, **_: Any) -> str:
        return "".join(CHARS[i - 3] if 3 <= i < self.vocab_size else "?" for i in ids if i >= 3)

    def bos_id(self) -> int:
        return BOS

    def eos_id(self) -> int:
        return EOS

    def pad_id(self) -> int:
        return PAD


def tiny_qwen3(seed: int = 0, vocab_size: int = 32) -> qwen3.Qwen3:
    """A random 2-layer Tunix Qwen3 (all weights random: Tunix zero-initialises the MLP)."""
    config = qwen3.ModelConfig(
        num_layers=2, vocab_size=vocab_size, embed_dim=32, hidden_dim=64, num_heads=4,
        head_dim=8, num_kv_heads=2, rope_theta=1_000_000, norm_eps=1e-6, use_tied_embedding=True,
    )
    # shapes only (no initialisation to compile), then numpy draws
    graphdef, state = nnx.split(nnx.eval_shape(lambda: qwen3.Qwen3(config, rngs=nnx.Rngs(seed))))
    rng = np.random.default_rng(seed)

    def draw(x):
        noise = rng.standard_normal(x.shape).astype(np.float32)
        return jnp.asarray(1.0 + 0.1 * noise if x.ndim == 1 else 0.3 * noise)

    return nnx.merge(graphdef, jax.tree.map(draw, state))


PROMPT_ALPHABET = CHARS[:8]


def reward(prompts, completions, **_: Any) -> list[float]:
    """Fraction of a completion's characters drawn from the prompts' alphabet (a-h)."""
    return [float(np.mean([c in PROMPT_ALPHABET for c in text])) if text else 0.0
            for text in completions]


def mismatch(rollout: list[np.ndarray], trainer: np.ndarray) -> dict[str, float]:
    """Rollout vs trainer logprobs of one step's tokens (r = trainer - rollout, per token)."""
    a = np.concatenate(rollout).astype(np.float32)
    b = np.concatenate([trainer[i, : len(lp)] for i, lp in enumerate(rollout)]).astype(np.float32)
    r = (b - a).astype(np.float64)
    return {
        "tokens": int(a.size),
        "bitwise_equal": int(np.sum(a.view(np.uint32) == b.view(np.uint32))),
        "max_abs_diff": float(np.max(np.abs(r))),
        "mean_abs_diff": float(np.mean(np.abs(r))),
        "k3": float(np.mean(np.exp(r) - r - 1.0)),
    }


class _Recorder:
    """Mixin for a rollout class: after each `generate`, the rollout's logprobs against the
    trainer's logprobs of the same tokens, computed with the trainer's current (pre-update)
    weights. `trainer_model` is set once the RLCluster exists."""

    trainer_model: Any = None

    def generate(self, prompts, rollout_config, **kwargs):
        out = super().generate(prompts, rollout_config, **kwargs)
        width = rollout_config.max_tokens_to_generate
        comp = np.stack([np.pad(t, (0, width - len(t)), constant_values=PAD) for t in out.tokens])
        prompt, comp = jnp.asarray(out.left_padded_prompt_tokens), jnp.asarray(comp)
        model = self.trainer_model
        graphdef, state = nnx.split(model)
        generic = common.compute_per_token_logps(
            graphdef, state, prompt_tokens=prompt, completion_tokens=comp, pad_id=PAD,
            eos_id=EOS, stop_gradient=True, temperature=rollout_config.temperature,
        )
        record = {"generic": mismatch(out.logprobs, np.asarray(generic))}
        if isinstance(model, JengineActor):
            exact = model.per_token_logps(prompt, comp, PAD, rollout_config.temperature)
            record["exact"] = mismatch(out.logprobs, np.asarray(exact))
            record["policy_version"] = self.policy_version
        self.records.append(record)
        return out


class RecordingJengineRollout(_Recorder, JengineRollout):
    def __init__(self, **kwargs):
        super().__init__(engine_config=EngineConfig(max_num_seqs=16, max_num_batched_tokens=128),
                         **kwargs)
        self.records = []


class RecordingVanillaRollout(_Recorder, vanilla_rollout.VanillaRollout):
    """Tunix's vanilla engine, built as RLCluster builds it for rollout_engine="vanilla"."""

    def __init__(self, rollout_actor, tokenizer, mesh, rollout_config):
        c = rollout_actor.config
        super().__init__(rollout_actor, tokenizer, base_rollout.CacheConfig(
            cache_size=rollout_config.kv_cache_size, num_layers=c.num_layers,
            num_kv_heads=c.num_kv_heads, head_dim=c.head_dim))
        self.records = []


def run(engine: str = "jengine", steps: int = 3, seed: int = 0, prompts_per_step: int = 2,
        num_generations: int = 4, max_tokens: int = 6, temperature: float = 0.9,
        top_p: float = 0.9, top_k: int = 8, learning_rate: float = 3e-3) -> dict[str, Any]:
    """One Tunix GRPO run; returns per-step records and Tunix's own loss metrics."""
    t0 = time.perf_counter()
    tokenizer = CharTokenizer()
    model = tiny_qwen3(seed, vocab_size=64)
    rollout_config = base_rollout.RolloutConfig(
        max_tokens_to_generate=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        max_prompt_length=8, kv_cache_size=32, return_logprobs=True, seed=seed,
    )
    if engine == "jengine":
        actor, rollout_cls = JengineActor(model, rollout_config), RecordingJengineRollout
    elif engine == "vanilla":
        actor, rollout_cls = model, RecordingVanillaRollout
    else:
        raise ValueError(f"engine={engine!r} must be 'jengine' or 'vanilla'")
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    roles = rl_cluster_lib.Role
    cluster_config = rl_cluster_lib.ClusterConfig(
        role_to_mesh={roles.ACTOR: mesh, roles.REFERENCE: mesh, roles.ROLLOUT: mesh},
        rollout_engine=rollout_cls,
        offload_to_cpu=False,
        training_config=rl_cluster_lib.RLTrainingConfig(
            actor_optimizer=optax.adam(learning_rate), eval_every_n_steps=10**9,
            max_steps=2 * steps, pbar_description=None,
        ),
        rollout_config=rollout_config,
    )
    cluster = rl_cluster_lib.RLCluster(actor=actor, tokenizer=tokenizer,
                                       cluster_config=cluster_config)
    cluster.rollout.trainer_model = cluster.actor_trainer.model
    rewards: list[float] = []

    def recorded_reward(prompts, completions, **kwargs):
        r = reward(prompts, completions)
        rewards.append(float(np.mean(r)))
        return r

    learner = grpo_learner.GRPOLearner(
        rl_cluster=cluster,
        algo_config=grpo_learner.GRPOConfig(num_generations=num_generations, num_iterations=2,
                                            beta=0.0),
        reward_fns=[recorded_reward],
    )
    in_loss = ("log_ratio/abs_mean", "is_ratio/min", "is_ratio/max")
    cluster.actor_trainer.with_rl_metrics_to_log(
        {"kl": np.mean, "pg_clipfrac": np.mean, **{k: np.mean for k in in_loss}})
    rng = np.random.default_rng(seed)
    # Tunix tree-maps over a batch: prompts must be one array (a leaf), not a list of strings
    data = [{"prompts": np.array(["".join(rng.choice(list(PROMPT_ALPHABET), 3))
                                  for _ in range(prompts_per_step)])} for _ in range(steps)]
    learner.train(data)
    logger, prefix = cluster.actor_trainer.metrics_logger, cluster.actor_trainer.metrics_prefix
    history = {k: logger.get_metric_history(prefix, k, "train").tolist()
               for k in ("loss", *in_loss)}
    steps_out = []
    for i, rec in enumerate(cluster.rollout.records):
        first = 2 * i  # train steps alternate: first update of the step, then the second
        rec = dict(rec, reward_mean=rewards[i] if i < len(rewards) else None,
                   loss=history["loss"][first:first + 2],
                   **{f"first_update/{k}": history[k][first] for k in in_loss})
        steps_out.append(rec)
    return {"engine": engine, "steps": steps_out, "seconds": time.perf_counter() - t0,
            "final_policy_version": getattr(cluster.rollout, "policy_version", None)}


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """Totals over the run: the mismatch table row(s) of one engine."""
    rows = {}
    for key in ("exact", "generic"):
        recs = [s[key] for s in result["steps"] if key in s]
        if not recs:
            continue
        n = sum(r["tokens"] for r in recs)
        rows[key] = {
            "tokens": n,
            "bitwise_equal": sum(r["bitwise_equal"] for r in recs),
            "max_abs_diff": max(r["max_abs_diff"] for r in recs),
            "mean_abs_diff": sum(r["mean_abs_diff"] * r["tokens"] for r in recs) / n,
            "k3": sum(r["k3"] * r["tokens"] for r in recs) / n,
        }
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engines", default="jengine,vanilla")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report_json", default=None)
    args = ap.parse_args()
    results = [run(e, steps=args.steps, seed=args.seed) for e in args.engines.split(",")]
    print(f"{'engine':8} {'trainer side':32} {'tokens':>6} {'bitwise':>8} {'max|d|':>9} "
          f"{'mean|d|':>9} {'k3':>9}")
    names = {"exact": "JengineActor.per_token_logps", "generic": "common.compute_per_token_logps"}
    for res in results:
        for key, row in summary(res).items():
            print(f"{res['engine']:8} {names[key]:32} {row['tokens']:6d} {row['bitwise_equal']:8d} "
                  f"{row['max_abs_diff']:9.2e} {row['mean_abs_diff']:9.2e} {row['k3']:9.2e}")
    for res in results:
        for i, s in enumerate(res["steps"]):
            first = s["first_update/log_ratio/abs_mean"]
            print(f"{res['engine']} step {i}: reward {s['reward_mean']:.3f}  loss "
                  f"{s['loss']}  first-update log_ratio/abs_mean {first:.3g}"
                  + (f"  policy_version {s['policy_version']}" if "policy_version" in s else ""))
        print(f"{res['engine']}: {res['seconds']:.1f} s")
    if args.report_json:
        with open(args.report_json, "w") as f:
            json.dump([dict(r, summary=summary(r)) for r in results], f, indent=1)


if __name__ == "__main__":
    main()
