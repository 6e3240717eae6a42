"""A tiny GRPO run on CPU: jengine rollouts, `jengine.rl` logprobs and losses, optax updates.

    python -m jengine.examples.rl_toy --steps 100 --out /tmp/rl_toy.png
    python -m jengine.examples.rl_toy --ablation --steps 20 --out /tmp/rl_ablation.png

Task: the prompt is `PROMPT_LEN` random symbols; every completion token should equal the prompt's
first symbol (reward = fraction of completion tokens that do). A 2-layer model with a 16-token
vocabulary learns it in a few dozen steps.

Each step: G samples for each of N prompts from the engine (sampled at temperature 0.9 by default,
so processed != raw logprobs; --top-k adds a filter); group-normalised advantages; `--updates` optax updates on the
clipped GRPO (or GSPO) objective whose old logprobs are the ROLLOUT's; then
`engine.update_weights(params, mode="keep")`. The first update of a step is on-policy: the
trainer's logprobs come from `rl.token_logprobs` with the params that produced the rollout, so the
ratio is exactly 1.0 (checked bitwise per token and asserted for jengine's default settings).

`--ablation` repeats the run with deliberately mismatched trainer-side settings (raw instead of
processed logprobs, a bf16 lm_head, fast non-invariant numerics) and plots/prints the on-policy
mismatch each one leaves.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from jengine import rl
from jengine.config import EngineConfig, ModelConfig, Numerics, SamplingParams
from jengine.examples import require

optax = require("optax")
from jengine.engine import Engine
from jengine.models.transformer import Model, init_params

VOCAB = 16
FIRST_SYMBOL = 2  # ids 0 and 1 are never used as prompt symbols
PROMPT_LEN = 3
COMPLETION_LEN = 2

MODEL = ModelConfig(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    tie_word_embeddings=True,
    max_position_embeddings=32,
    name="rl-toy",
)

# Trainer-side settings. "default" matches the engine (jengine's defaults); the others do not.
VARIANTS = {
    "default": dict(logprobs_mode="processed_logprobs", numerics=Numerics()),
    "raw_logprobs": dict(logprobs_mode="raw_logprobs", numerics=Numerics()),
    "bf16_lm_head": dict(logprobs_mode="processed_logprobs", numerics=Numerics(lm_head_dtype="bfloat16")),
    "fast_numerics": dict(logprobs_mode="processed_logprobs", numerics=Numerics(mode="fast")),
}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    steps: int = 40
    seed: int = 0
    prompts_per_step: int = 8
    group_size: int = 8
    updates_per_step: int = 2
    learning_rate: float = 3e-3
    temperature: float = 0.9
    top_k: int = 0
    loss: str = "grpo"  # or "gspo"
    clip_eps: float = 0.2
    variant: str = "default"
    update_mode: str = "keep"


def reward_fn(prompt: list[int], completion: list[int]) -> float:
    """Fraction of completion tokens equal to the prompt's first token."""
    return float(np.mean([t == prompt[0] for t in completion])) if completion else 0.0


def make_prompts(rng: np.random.Generator, n: int) -> list[list[int]]:
    return [list(map(int, rng.integers(FIRST_SYMBOL, VOCAB, PROMPT_LEN))) for _ in range(n)]


@functools.partial(jax.jit, static_argnames=("trainer", "loss", "clip_eps", "tx"))
def train_step(params, opt_state, batch, sampling, *, trainer, loss, clip_eps, tx):
    """One optax update. Returns (params, opt_state, logp used in the loss, entropy, loss)."""
    settings = dict(trainer)
    mask = rl.completion_mask(batch["prompt_lens"], batch["completion_lens"], batch["tokens"].shape[1])

    def objective(p):
        logp, ent = rl.token_logprobs(
            p, MODEL, batch["tokens"], batch["prompt_lens"], batch["completion_lens"],
            **sampling, with_entropy=True, **settings,
        )
        if loss == "gspo":
            value, _ = rl.gspo_loss(logp, batch["logprobs"], batch["advantages"], mask,
                                      eps_low=clip_eps, eps_high=clip_eps)
        else:
            value, _ = rl.grpo_loss(logp, batch["logprobs"], batch["advantages"], mask,
                                      eps_low=clip_eps, eps_high=clip_eps)
        return value, (logp, ent)

    (value, (logp, ent)), grads = jax.value_and_grad(objective, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, logp, ent, value


def run(cfg: RunConfig, log=print) -> list[dict]:
    """Trains for cfg.steps; returns one dict of metrics per step."""
    trainer = tuple(sorted(VARIANTS[cfg.variant].items()))
    rng = np.random.default_rng(cfg.seed)
    params = init_params(MODEL, seed=cfg.seed)
    engine = Engine(
        Model(MODEL, params),
        EngineConfig(max_model_len=PROMPT_LEN + COMPLETION_LEN, max_num_seqs=64,
                     max_num_batched_tokens=256, page_size=4, seed=cfg.seed),
    )
    tx = optax.adam(cfg.learning_rate)
    opt_state = tx.init(params)
    sp_kw = dict(temperature=cfg.temperature, top_k=cfg.top_k, max_tokens=COMPLETION_LEN, ignore_eos=True)
    sampling = dict(temperature=cfg.temperature, top_k=cfg.top_k)
    history = []
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        version = engine.policy_version
        prompts = make_prompts(rng, cfg.prompts_per_step)
        batch_prompts = [p for p in prompts for _ in range(cfg.group_size)]
        sps = [SamplingParams(**sp_kw, seed=(step * 10_007 + i) % 2**31) for i in range(len(batch_prompts))]
        outs = engine.generate(batch_prompts, sps)
        assert all((o.policy_versions == version).all() for o in outs)
        t_roll = time.perf_counter() - t0
        rewards = np.asarray([reward_fn(p, o.token_ids) for p, o in zip(batch_prompts, outs)], np.float32)
        adv = np.asarray(rl.group_advantages(rewards.reshape(cfg.prompts_per_step, cfg.group_size))).reshape(-1)
        packed = rl.pack(batch_prompts, [o.token_ids for o in outs], rollout_logprobs=[o.logprobs for o in outs])
        batch = {k: jnp.asarray(v) for k, v in packed.items()}
        batch["advantages"] = jnp.asarray(adv)
        mask = rl.completion_mask(batch["prompt_lens"], batch["completion_lens"], batch["tokens"].shape[1])
        record = {"step": step, "reward": float(rewards.mean()), "policy_version": version}
        for k in range(cfg.updates_per_step):
            params, opt_state, logp, ent, loss = train_step(
                params, opt_state, batch, sampling, trainer=trainer, loss=cfg.loss,
                clip_eps=cfg.clip_eps, tx=tx,
            )
            m = rl.to_host(rl.mismatch_metrics(logp, batch["logprobs"], mask,
                                               eps_low=cfg.clip_eps, eps_high=cfg.clip_eps))
            if k == 0:  # on-policy: same params as the rollout
                record.update(
                    entropy=float(jnp.sum(ent * mask) / jnp.sum(mask)),
                    onpolicy_bitwise_equal=m["bitwise_equal"],
                    onpolicy_tokens=m["num_tokens"],
                    onpolicy_max_abs_diff=m["max_abs_diff"],
                    onpolicy_mean_abs=m["mean_abs_log_ratio"],
                    onpolicy_k3=m["k3"],
                    onpolicy_clip_frac=m["clip_frac"],
                    onpolicy_ratio_mean=m["ratio_mean"],
                    onpolicy_ratio_max=m["ratio_max"],
                    loss=float(loss),
                )
                if cfg.variant == "default":
                    assert m["bitwise_equal"] == m["num_tokens"], (
                        f"step {step}: on-policy ratio is not exactly 1.0 "
                        f"({m['bitwise_equal']}/{m['num_tokens']} tokens bitwise equal)"
                    )
            else:  # the last off-policy update of the step sees the ratio move
                record.update(clip_frac=m["clip_frac"], k3=m["k3"], ratio_mean=m["ratio_mean"],
                              ratio_max=m["ratio_max"])
        engine.update_weights(params, mode=cfg.update_mode)  # in-flight capable; engine idle here
        record["seconds"] = time.perf_counter() - t0
        record["rollout_seconds"] = t_roll
        history.append(record)
        log(
            f"[{cfg.variant}] step {step:3d} reward {record['reward']:.3f} "
            f"entropy {record['entropy']:.3f} on-policy bitwise {record['onpolicy_bitwise_equal']}/"
            f"{record['onpolicy_tokens']} max|dlogp| {record['onpolicy_max_abs_diff']:.2e} "
            f"clip {record.get('clip_frac', 0):.3f} k3 {record.get('k3', 0):.2e} "
            f"ratio mean/max {record.get('ratio_mean', 1):.3f}/{record.get('ratio_max', 1):.3f} "
            f"({record['seconds']:.1f}s)"
        )
    engine.close()
    return history


def plot_run(history: list[dict], path: str) -> None:
    matplotlib = require("matplotlib")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    panels = [
        ("reward", ["reward"]),
        ("entropy (nats)", ["entropy"]),
        ("clip fraction (2nd update)", ["clip_frac"]),
        ("KL(new||old) k3 (2nd update)", ["k3"]),
        ("ratio (2nd update)", ["ratio_mean", "ratio_max"]),
        ("on-policy bitwise-equal fraction", ["onpolicy_frac"]),
    ]
    for h in history:
        h["onpolicy_frac"] = h["onpolicy_bitwise_equal"] / max(h["onpolicy_tokens"], 1)
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            ax.plot(steps, [h.get(key, np.nan) for h in history], label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_ablation(results: dict[str, list[dict]], path: str) -> None:
    matplotlib = require("matplotlib")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    panels = [
        ("on-policy max |logp_train - logp_rollout|", "onpolicy_max_abs_diff", True),
        ("on-policy k3", "onpolicy_k3", True),
        ("on-policy clip fraction", "onpolicy_clip_frac", False),
        ("on-policy ratio mean", "onpolicy_ratio_mean", False),
        ("on-policy bitwise-equal fraction", "onpolicy_frac", False),
        ("reward", "reward", False),
    ]
    for name, hist in results.items():
        for h in hist:
            h["onpolicy_frac"] = h["onpolicy_bitwise_equal"] / max(h["onpolicy_tokens"], 1)
    for ax, (title, key, log) in zip(axes.flat, panels):
        for name, hist in results.items():
            ys = [h[key] for h in hist]
            if log:
                ys = [max(y, 1e-12) for y in ys]  # exact zeros drawn at 1e-12
            ax.plot([h["step"] for h in hist], ys, label=name)
        if log:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def ablation_table(results: dict[str, list[dict]]) -> str:
    rows = [
        (
            "| trainer-side setting | bitwise-equal tokens (on-policy) | mean abs dlogp | "
            "max abs dlogp | mean k3 | mean clip frac | mean ratio | reward (last 3 steps) |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, hist in results.items():
        eq = sum(h["onpolicy_bitwise_equal"] for h in hist)
        tot = sum(h["onpolicy_tokens"] for h in hist)
        tail = hist[-min(3, len(hist)):]
        rows.append(
            f"| {name} | {eq}/{tot} | {np.mean([h['onpolicy_mean_abs'] for h in hist]):.3g} | "
            f"{np.max([h['onpolicy_max_abs_diff'] for h in hist]):.3g} | "
            f"{np.mean([h['onpolicy_k3'] for h in hist]):.3g} | "
            f"{np.mean([h['onpolicy_clip_frac'] for h in hist]):.3g} | "
            f"{np.mean([h['onpolicy_ratio_mean'] for h in hist]):.4f} | "
            f"{np.mean([h['reward'] for h in tail]):.3f} |"
        )
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default="rl_toy.png", help="PNG path for the plot")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ablation", action="store_true",
                        help="also run mismatched trainer-side settings and compare")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated ablation variants")
    parser.add_argument("--loss", choices=("grpo", "gspo"), default="grpo")
    parser.add_argument("--update-mode", choices=("keep", "recompute", "abort"), default="keep")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--temperature", type=float, default=0.9,
                        help="sampling temperature (!= 1 so processed and raw logprobs differ)")
    parser.add_argument("--top-k", type=int, default=0)
    args = parser.parse_args(argv)
    base = RunConfig(steps=args.steps, seed=args.seed, loss=args.loss,
                     clip_eps=0.2 if args.loss == "grpo" else 4e-3, update_mode=args.update_mode,
                     learning_rate=args.lr, temperature=args.temperature, top_k=args.top_k)
    if not args.ablation:
        history = run(base)
        plot_run(history, args.out)
        print(f"reward first 3 steps {np.mean([h['reward'] for h in history[:3]]):.3f} -> "
              f"last 3 steps {np.mean([h['reward'] for h in history[-3:]]):.3f}; plot: {args.out}")
        return
    results = {}
    for name in args.variants.split(","):
        results[name] = run(dataclasses.replace(base, variant=name))
    plot_ablation(results, args.out)
    print(ablation_table(results))
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
