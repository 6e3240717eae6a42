"""Tool use on a real model: SmolLM2-135M-Instruct, a calculator, GRPO over whole trajectories.

    python -m jengine.examples.tool_use --out runs/tool_use            # 10 steps
    python -m jengine.examples.tool_use --steps 2 --group 4 --prompts_per_step 2

Task (generated in code, verifiable): "What is A * B + C?" (or A * B - C, A + B * C), operands up
to --max_operand, through the model's chat template, with a system prompt that explains the
calculator: the model writes `<calc>EXPRESSION</calc>`, its turn stops there (a stop string that
spans several tokens), and the environment answers in a `tool` message rendered with the chat
template (`rl.ChatTemplate`); a turn without a call ends the trajectory, whose reward is 1 when
its last turn's last integer is the answer, 0.5 when a tool call computed it. The assistant's first
turn opens with `<calc>` (the prompt's last tokens, the environment's), so a 135M model calls the
tool at all. Up to --max_turns model turns, --budget tokens.

Rollouts: `rl.multi_turn` on an `Engine` with the model's tokenizer and prefix caching: every
turn is a request whose prompt is the whole trajectory so far in token ids (the model's tokens as
sampled, never decoded and encoded again), so the earlier turns' KV comes from the prefix cache.

Trainer: `rl.pack(trajectories)` -> `rl.token_logprobs` (mask: the model's tokens) + optax Adam on
the clipped GRPO objective with group-normalised advantages over whole trajectories, the
rollout's processed logprobs as the behaviour policy (`jengine.examples.grpo`'s update, with the
loss mask). One update per step: before it, every model token's trainer-side logprob is its
rollout logprob bit for bit, across all turns (the run stops if one is not).

Writes DIR/metrics.jsonl (one record per step, `METRIC_KEYS`), DIR/summary.json and
DIR/transcripts.txt (the first trajectories of the last step, as text).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import json
import operator
import os
import re
import sys
import time

import jax.numpy as jnp
import numpy as np

from jengine import rl
from jengine.config import EngineConfig, SamplingParams
from jengine.engine import Engine
from jengine.examples import grpo

METRIC_KEYS = (
    "step", "reward_mean", "trajectories", "turns_mean", "turns_max", "tool_calls",
    "tool_call_errors", "statuses", "model_tokens", "bitwise_equal", "env_tokens",
    "cached_tokens", "prefill_tokens", "continuation_cached_fraction", "k3", "ratio_max", "loss",
    "rollout_seconds", "train_seconds", "seconds", "verified_requests", "verify_mismatches",
)  # fmt: skip
SYSTEM = ("Compute with the calculator: write <calc>expression</calc>, the tool replies with "
          "the value. Then give the number only.")  # fmt: skip
PRIMER = "<calc>"  # the assistant's first turn opens with a call (the prompt's last tokens)
FORMS = ("{a} * {b} + {c}", "{a} * {b} - {c}", "{a} + {b} * {c}")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.USub: operator.neg, ast.UAdd: operator.pos}  # fmt: skip


def calculate(expression: str) -> str:
    """The value of an arithmetic expression (+ - * / parentheses, numbers), or 'error: ...'."""

    def ev(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError("only numbers, + - * / and parentheses")

    try:
        value = ev(ast.parse(expression.strip().replace("x", "*"), mode="eval").body)
        if abs(value) > 1e12:
            raise ValueError("too large")
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError) as e:
        return f"error: {e}"
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    steps: int = 10
    group: int = 8
    prompts_per_step: int = 4
    lr: float = 1e-5
    temperature: float = 0.8
    max_tokens: int = 32  # per model turn
    max_turns: int = 3
    budget: int = 192  # tokens per trajectory, prompt included
    max_operand: int = 50
    seed: int = 0
    micro_batch: int = 1  # rows per gradient pass (a row is --budget tokens)
    clip_eps: float = 0.2
    verify_fraction: float = 0.0
    out: str = "tool_use_run"

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, max_tokens=self.max_tokens,
                              stop=("</calc>",))  # fmt: skip


def problems(cfg: RunConfig):
    """Step k's problems: (question, answer) pairs drawn by rng(seed, k)."""
    for k in range(cfg.steps):
        rng = np.random.default_rng([cfg.seed, k])
        out = []
        for _ in range(cfg.prompts_per_step):
            a, b, c = (int(x) for x in rng.integers(2, cfg.max_operand + 1, 3))
            form = FORMS[int(rng.integers(len(FORMS)))].format(a=a, b=b, c=c)
            out.append((f"What is {form}?", int(calculate(form))))
        yield out


class Calculator:
    """The environment: after a turn that stopped on `</calc>`, the expression's value as a tool
    message (ids from the chat template); after any other turn, the end (None)."""

    def __init__(self, chat: rl.ChatTemplate):
        self.chat = chat

    def __call__(self, traj: rl.Trajectory):
        turn = traj.turns[-1]
        if turn.stop_reason != "</calc>":
            return None
        expression = (turn.text or "").rsplit(PRIMER, 1)[-1]  # the first turn's opens the prompt
        result = calculate(expression)
        traj.meta["calls"].append((expression, result))
        return self.chat.env([{"role": "tool", "content": result}], after=turn.token_ids)


def reward(traj: rl.Trajectory) -> float:
    """1 when the last turn's last integer is the answer; 0.5 when a tool call computed it; 0."""
    answer, numbers = traj.meta["answer"], re.findall(r"-?\d+", traj.turns[-1].text or "")
    if traj.status == "done" and numbers and int(numbers[-1]) == answer:
        return 1.0
    return 0.5 if str(answer) in [result for _, result in traj.meta["calls"]] else 0.0


def rollout(engine, chat, cfg: RunConfig, questions, step: int) -> list[rl.Trajectory]:
    prompts, params, meta = [], [], []
    for q, (question, answer) in enumerate(questions):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        prompt = chat.prompt(messages) + chat.tokenizer.encode(PRIMER)
        for i in range(cfg.group):
            seed = (cfg.seed * 1_000_003 + (step * len(questions) + q) * cfg.group + i) % 2**31
            prompts.append(prompt)
            params.append(dataclasses.replace(cfg.sampling, seed=seed))
            meta.append({"answer": answer, "calls": []})
    return rl.multi_turn(engine, Calculator(chat), prompts, params, max_turns=cfg.max_turns,
                         max_tokens=cfg.budget, meta=meta)  # fmt: skip


class Trainer:
    """GRPO over packed trajectories, fixed shapes ([group * prompts_per_step, budget])."""

    def __init__(self, model, numerics, cfg: RunConfig):
        self.config, self.numerics, self.cfg = model.config, numerics, cfg
        self.params = model.params
        self.tx = grpo.optax.chain(grpo.optax.clip_by_global_norm(1.0), grpo.optax.adam(cfg.lr))
        self.opt_state = self.tx.init(self.params)

    def step(self, trajs: list[rl.Trajectory]) -> dict:
        cfg = self.cfg
        rewards = np.asarray([reward(t) for t in trajs], np.float32)
        packed = rl.pack(trajs, length=cfg.budget)
        packed["advantages"] = np.asarray(
            rl.group_advantages(rewards.reshape(-1, cfg.group))).reshape(-1)
        mask = packed["loss_mask"]
        n_total = float(mask.sum())
        grads, loss, logps = grpo._zeros(self.params), 0.0, []
        for s in range(0, len(trajs), cfg.micro_batch):
            b = {k: jnp.asarray(v[s : s + cfg.micro_batch]) for k, v in packed.items()
                 if k != "versions"}  # fmt: skip
            logp = grpo._logprobs(self.params, b, cfg.temperature, config=self.config,
                                  numerics=self.numerics)  # fmt: skip
            l, _, _, grads = grpo._grads(self.params, grads, b, logp, n_total, cfg.temperature,
                                         config=self.config, numerics=self.numerics,
                                         correction="none", clip_eps=cfg.clip_eps,
                                         is_cap=2.0)  # fmt: skip
            loss += float(l)
            logps.append(np.asarray(logp))
        self.params, self.opt_state = grpo._apply(self.params, self.opt_state, grads, tx=self.tx)
        logp = np.concatenate(logps)
        m = rl.to_host(rl.mismatch_metrics(logp, packed["logprobs"], mask))
        return {"reward_mean": float(rewards.mean()), "model_tokens": m["num_tokens"],
                "bitwise_equal": m["bitwise_equal"], "k3": m["k3"], "ratio_max": m["ratio_max"],
                "loss": loss}  # fmt: skip


def trajectory_metrics(trajs: list[rl.Trajectory]) -> dict:
    turns = [len(t.model_turns) for t in trajs]
    later = [m for t in trajs for m in t.model_turns[1:]]  # continuations: earlier turns cached?
    later_prompt = sum(m.cached_tokens + m.prefill_tokens for m in later)
    calls = [c for t in trajs for c in t.meta["calls"]]
    statuses: dict[str, int] = {}
    for t in trajs:
        statuses[t.status] = statuses.get(t.status, 0) + 1
    return {
        "trajectories": len(trajs), "turns_mean": float(np.mean(turns)), "turns_max": max(turns),
        "tool_calls": len(calls), "tool_call_errors": sum(r.startswith("error") for _, r in calls),
        "statuses": statuses,
        "env_tokens": sum(len(x.token_ids) for t in trajs for x in t.turns if x.role == "env"),
        "cached_tokens": sum(m.cached_tokens for t in trajs for m in t.model_turns),
        "prefill_tokens": sum(m.prefill_tokens for t in trajs for m in t.model_turns),
        "continuation_cached_fraction": (sum(m.cached_tokens for m in later) / later_prompt
                                         if later_prompt else None),
    }  # fmt: skip


def transcript(tok, traj: rl.Trajectory) -> str:
    head = f"# reward {reward(traj)} status {traj.status} answer {traj.meta['answer']}\n"
    return head + tok.decode(traj.tokens, skip_special_tokens=False) + "\n"


def run(cfg: RunConfig, log=print) -> list[dict]:
    """Trains for cfg.steps; writes cfg.out/{metrics.jsonl, summary.json, transcripts.txt}."""
    os.makedirs(cfg.out, exist_ok=True)
    t_start = time.perf_counter()
    model, tok = grpo.load(grpo.model_path("smollm2"))
    chat = rl.ChatTemplate(tok)
    rows = cfg.group * cfg.prompts_per_step
    config = EngineConfig(max_model_len=cfg.budget, max_num_seqs=max(8, min(64, rows)),
                          max_num_batched_tokens=512, seed=cfg.seed,
                          verify_fraction=cfg.verify_fraction)  # fmt: skip
    engine = Engine(model, config, tokenizer=tok)
    trainer = Trainer(model, engine.numerics, cfg)
    records = []
    with open(os.path.join(cfg.out, "metrics.jsonl"), "w") as f:
        for step, questions in enumerate(problems(cfg)):
            t0 = time.perf_counter()
            trajs = rollout(engine, chat, cfg, questions, step)
            t_roll = time.perf_counter() - t0
            record = {"step": step, **trajectory_metrics(trajs), **trainer.step(trajs)}
            t_train = time.perf_counter() - t0 - t_roll
            engine.update_weights(trainer.params, mode="keep")
            stats = engine.stats
            record.update(rollout_seconds=t_roll, train_seconds=t_train,
                          seconds=time.perf_counter() - t0,
                          verified_requests=stats["verified_requests"],
                          verify_mismatches=stats["verify_mismatches"])  # fmt: skip
            records.append(record)
            f.write(json.dumps(record) + "\n")
            f.flush()
            frac = record["continuation_cached_fraction"]
            log(f"step {step:3d} reward {record['reward_mean']:.3f} turns "
                f"{record['turns_mean']:.2f} (max {record['turns_max']}) tool calls "
                f"{record['tool_calls']} bitwise {record['bitwise_equal']}/"
                f"{record['model_tokens']} cached {record['cached_tokens']} / computed "
                f"{record['prefill_tokens']} prompt tokens (continuations "
                f"{'n/a' if frac is None else f'{frac:.1%}'} from cache) "
                f"{record['seconds']:.1f}s")  # fmt: skip
            if record["bitwise_equal"] != record["model_tokens"]:
                raise AssertionError(f"step {step}: {record['bitwise_equal']}/"
                                     f"{record['model_tokens']} model tokens bitwise equal to "
                                     "the rollout: the update is not on-policy")  # fmt: skip
    with open(os.path.join(cfg.out, "transcripts.txt"), "w") as f:
        f.write("\n".join(transcript(tok, t) for t in trajs[: 2 * cfg.group : cfg.group // 2]))
    summary = {
        "config": dataclasses.asdict(cfg), "wall_seconds": time.perf_counter() - t_start,
        "model_tokens": sum(r["model_tokens"] for r in records),
        "bitwise_equal": sum(r["bitwise_equal"] for r in records),
        "tool_calls": sum(r["tool_calls"] for r in records),
        "reward_first_last": [records[0]["reward_mean"], records[-1]["reward_mean"]],
        "engine_stats": engine.stats,
    }  # fmt: skip
    with open(os.path.join(cfg.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    log(f"{summary['bitwise_equal']}/{summary['model_tokens']} model tokens bitwise equal over "
        f"{len(records)} steps; {summary['tool_calls']} tool calls; "
        f"{cfg.out}/metrics.jsonl")  # fmt: skip
    engine.close()
    return records


def main(argv=None) -> None:
    d = RunConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    for f in dataclasses.fields(RunConfig):
        p.add_argument(f"--{f.name}", type=type(getattr(d, f.name)), default=getattr(d, f.name))
    positive = ("steps", "prompts_per_step", "max_tokens", "max_turns", "micro_batch")
    _, cfg = grpo.parse(p, argv, positive, RunConfig)
    run(cfg, log=functools.partial(print, flush=True))


if __name__ == "__main__":
    sys.exit(main())
