"""Diagnostics: the engine's step trace, and rollout-vs-trainer parity metrics.

Step trace. `EngineConfig(trace_path=...)` appends one JSON object per engine step to a JSONL
file. Each record (`TRACE_SCHEMA`) has:

| key | type | meaning |
|---|---|---|
| step | int | step index, from 0, increasing by 1 within one engine |
| bucket_tokens | int | token bucket the step ran at (a power of two, >= `min_token_bucket`) |
| bucket_seqs | int | sequence/logit-row bucket the step ran at |
| prefill_tokens | int | prompt (or recompute) tokens in the step |
| decode_tokens | int | decode tokens in the step (one per decoding sequence) |
| seqs | int | sequences scheduled in the step |
| policy_version | int | weights version that ran the step (bumped by `update_weights`) |
| compiled | bool | the step's bucket was compiled in this step (first use) |
| step_seconds | float | wall seconds of the device step, compilation included when `compiled` |
| pages_free | int | free KV pages after the step |
| preemptions | int | preemptions so far (cumulative) |
| compile_seconds | float | optional: seconds of this step spent compiling (0.0 unless `compiled`) |
| cached_tokens | int | optional: prompt tokens the prefix cache served to the sequences admitted in the step (not computed) |
| verify_mismatches | list | optional: request ids whose rollout logprobs the parity guard could not reproduce |

`read_trace` parses a file, `validate_trace` checks every record against the schema (types,
`prefill_tokens + decode_tokens <= bucket_tokens`, steps increasing by one, preemptions never
decreasing) and `summarize_trace` aggregates it.

Parity. `parity_report` scores a rollout's tokens with `jengine.score` and compares them with the
rollout's logprobs. With r = score - rollout per token (log pi_train - log pi_rollout), it reports
the metrics RL trainers log, named as `jengine.rl.metrics` names them (and computed by it): the
bitwise-equal count, max/mean |r|, ratio_mean (mean e^r), k1 = mean(-r), k3 = mean(e^r - r - 1),
clip_frac and the effective sample size. With jengine's defaults every
one of them is exact (0 difference, ratio 1).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

TRACE_SCHEMA: dict[str, type | tuple[type, ...]] = {
    "step": int,
    "bucket_tokens": int,
    "bucket_seqs": int,
    "prefill_tokens": int,
    "decode_tokens": int,
    "seqs": int,
    "policy_version": int,
    "compiled": bool,
    "step_seconds": (int, float),
    "pages_free": int,
    "preemptions": int,
}
OPTIONAL_TRACE_KEYS: dict[str, type | tuple[type, ...]] = {
    "compile_seconds": (int, float),
    "cached_tokens": int,
    "verify_mismatches": list,  # request ids the runtime parity guard found differing
}

LOGPROB_MODES = ("processed_logprobs", "raw_logprobs")  # modes whose values are log-probabilities


class TraceError(ValueError):
    """A trace record does not match `TRACE_SCHEMA`; the message names the line and the key."""


# -- step trace ------------------------------------------------------------------------------


def read_trace(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Parses a UTF-8 JSONL file of objects, such as a step trace (blank lines skipped).

    Raises:
      TraceError: the file is not UTF-8, or a line is not a JSON object (names the file, the
        line number and the column within that line, not the JSON decoder's own line count).
    """
    with open(path, encoding="utf-8") as f:
        try:  # line breaks as a file reads them (U+2028 inside a JSON string is not one)
            lines = [line.removesuffix("\n") for line in f]
        except UnicodeDecodeError as e:
            raise TraceError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:  # e.pos: the offset into this line
            at = f"column {e.pos + 1}"
            at = f"the end of the line ({at})" if e.pos >= len(line.rstrip()) else at
            raise TraceError(f"{path}:{lineno}: not JSON: {e.msg} at {at}") from None
        if not isinstance(record, dict):
            got = json.dumps(record)
            got = got if len(got) <= 40 else got[:39] + "…"
            raise TraceError(f"{path}:{lineno}: each line must be a JSON object, got {got}")
        records.append(record)
    return records


def _type_ok(value: Any, types: type | tuple[type, ...]) -> bool:
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in types:
        return False  # JSON true is not an int here
    return isinstance(value, types)


def validate_trace(records: Sequence[dict[str, Any]], *, strict: bool = False) -> None:
    """Checks records against `TRACE_SCHEMA`.

    Checks: every schema key present with its type, counts non-negative, the step's tokens fit its
    bucket, `step` increasing by exactly one (a new engine appending to the same file restarts at
    0, which is allowed), `preemptions` never decreasing within one engine's run.

    Args:
      records: from `read_trace`.
      strict: also reject keys outside the schema.
    Raises:
      TraceError: the first violation, naming the record index and key.
    """
    prev: dict[str, Any] | None = None
    known = set(TRACE_SCHEMA) | set(OPTIONAL_TRACE_KEYS)
    for i, r in enumerate(records):
        for key, types in TRACE_SCHEMA.items():
            if key not in r:
                raise TraceError(f"record {i}: missing key {key!r}")
            if not _type_ok(r[key], types):
                raise TraceError(f"record {i}: {key}={r[key]!r} has type {type(r[key]).__name__}")
        for key, types in OPTIONAL_TRACE_KEYS.items():
            if key in r and not _type_ok(r[key], types):
                raise TraceError(f"record {i}: {key}={r[key]!r} has type {type(r[key]).__name__}")
        if strict and set(r) - known:
            raise TraceError(f"record {i}: unknown keys {sorted(set(r) - known)}")
        for key in known:
            if key in r and isinstance(r[key], (int, float)) and not isinstance(r[key], bool) and r[key] < 0:
                raise TraceError(f"record {i}: {key}={r[key]!r} is negative")
        if r["prefill_tokens"] + r["decode_tokens"] > r["bucket_tokens"]:
            raise TraceError(
                f"record {i}: prefill_tokens + decode_tokens = "
                f"{r['prefill_tokens'] + r['decode_tokens']} exceeds bucket_tokens={r['bucket_tokens']}"
            )
        if r["seqs"] > r["bucket_seqs"]:
            raise TraceError(f"record {i}: seqs={r['seqs']} exceeds bucket_seqs={r['bucket_seqs']}")
        if prev is not None and r["step"] != 0:
            if r["step"] != prev["step"] + 1:
                raise TraceError(f"record {i}: step={r['step']} follows step={prev['step']}")
            if r["preemptions"] < prev["preemptions"]:
                raise TraceError(
                    f"record {i}: preemptions={r['preemptions']} decreased from {prev['preemptions']}"
                )
        elif prev is None and r["step"] != 0:
            raise TraceError(f"record {i}: the first record has step={r['step']}, expected 0")
        prev = r


def summarize_trace(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Aggregates a (validated) trace.

    Returns:
      steps, compiled_steps, compile_seconds (sum over compiled steps), run_seconds (the other
      steps), tokens (prefill + decode), decode_tokens, tokens_per_second (over the steps that
      did not compile), buckets ({bucket_tokens: steps}), max_seqs, min_pages_free, preemptions,
      policy_versions (sorted distinct), cached_tokens (prompt tokens served from the prefix
      cache).
    """
    compiled = [r for r in records if r["compiled"]]
    warm = [r for r in records if not r["compiled"]]
    run_seconds = sum(r["step_seconds"] for r in warm)
    warm_tokens = sum(r["prefill_tokens"] + r["decode_tokens"] for r in warm)
    buckets: dict[int, int] = {}
    for r in records:
        buckets[r["bucket_tokens"]] = buckets.get(r["bucket_tokens"], 0) + 1
    return {
        "steps": len(records),
        "compiled_steps": len(compiled),
        "compile_seconds": round(
            sum(r.get("compile_seconds", r["step_seconds"]) for r in compiled), 3
        ),
        "run_seconds": round(run_seconds, 3),
        "tokens": sum(r["prefill_tokens"] + r["decode_tokens"] for r in records),
        "decode_tokens": sum(r["decode_tokens"] for r in records),
        "tokens_per_second": round(warm_tokens / run_seconds, 2) if run_seconds > 0 else None,
        "buckets": dict(sorted(buckets.items())),
        "max_seqs": max((r["seqs"] for r in records), default=0),
        "min_pages_free": min((r["pages_free"] for r in records), default=None),
        "preemptions": max((r["preemptions"] for r in records), default=0),
        "policy_versions": sorted({r["policy_version"] for r in records}),
        "cached_tokens": sum(r.get("cached_tokens", 0) for r in records),
    }


# -- parity ----------------------------------------------------------------------------------


def _diff(trainer: np.ndarray, rollout: np.ndarray) -> np.ndarray:
    """trainer - rollout, with equal values (both -inf included) giving exactly 0."""
    with np.errstate(invalid="ignore"):
        return np.where(trainer == rollout, 0.0, trainer.astype(np.float64) - rollout)


def mismatch_metrics(
    trainer: Sequence[np.ndarray] | np.ndarray,
    rollout: Sequence[np.ndarray] | np.ndarray,
    *,
    are_logprobs: bool = True,
    clip_eps: float = 0.2,
) -> dict[str, Any]:
    """Per-token mismatch between trainer-side and rollout-side numbers for the same tokens.

    Args:
      trainer, rollout: per sequence f32[len] (or one flat array each), aligned token for token.
      are_logprobs: the values are log-probabilities (processed/raw_logprobs modes); otherwise
        (logit modes) the ratio-based metrics are None.
      clip_eps: the PPO clip range for `clip_frac` (ratio outside [1 - eps, 1 + eps]).
    Returns:
      num_sequences, num_tokens, bitwise_equal (tokens whose float32 bits agree),
      bitwise_equal_fraction, sequences_bitwise_equal, max_abs_diff, mean_abs_diff, rms_diff,
      mean_diff (mean(trainer - rollout)); these four over the finite differences, and
      non_finite_diffs counts the rest (a token one side's filters dropped: -inf there, so its
      ratio is 0 or inf and k1/k3 become inf); first_mismatch ([sequence, token] or None); and
      with w = e^r the ratio metrics named as `jengine.rl.metrics` names them:
      ratio_mean, ratio_min, ratio_max, k1 (mean(-r)), k3 (mean(w - r - 1)), clip_frac (w
      outside [1 - clip_eps, 1 + clip_eps]), ess ((sum w)^2 / sum w^2), ess_frac (ess / n),
      mean_abs_log_ratio (None for logit modes).
    """
    if isinstance(trainer, np.ndarray) and trainer.ndim == 1:
        trainer, rollout = [trainer], [rollout]
    trainer = [np.asarray(t, np.float32) for t in trainer]
    rollout = [np.asarray(r, np.float32) for r in rollout]
    if len(trainer) != len(rollout):
        raise ValueError(f"{len(trainer)} trainer sequences but {len(rollout)} rollout sequences")
    first = None
    seq_equal = 0
    for i, (t, r) in enumerate(zip(trainer, rollout)):
        if t.shape != r.shape:
            raise ValueError(f"sequence {i}: trainer has {t.shape[0]} tokens, rollout {r.shape[0]}")
        eq = t.view(np.uint32) == r.view(np.uint32)
        seq_equal += bool(eq.all())
        if first is None and not eq.all():
            first = [i, int(np.argmin(eq))]
    t = np.concatenate(trainer) if trainer else np.zeros(0, np.float32)
    r = np.concatenate(rollout) if rollout else np.zeros(0, np.float32)
    n = int(t.size)
    equal = int(np.sum(t.view(np.uint32) == r.view(np.uint32)))
    d = _diff(t, r)
    finite = np.isfinite(d)
    absd = np.abs(d[finite])
    out: dict[str, Any] = {
        "num_sequences": len(trainer),
        "num_tokens": n,
        "bitwise_equal": equal,
        "bitwise_equal_fraction": equal / n if n else 1.0,
        "sequences_bitwise_equal": seq_equal,
        "max_abs_diff": float(absd.max()) if absd.size else 0.0,
        "mean_abs_diff": float(absd.mean()) if absd.size else 0.0,
        "rms_diff": float(np.sqrt(np.mean(absd**2))) if absd.size else 0.0,
        "mean_diff": float(d[finite].mean()) if absd.size else 0.0,
        "non_finite_diffs": int(n - finite.sum()),
        "first_mismatch": first,
    }
    ratio_keys = ("ratio_mean", "ratio_min", "ratio_max", "k1", "k3", "clip_frac", "ess", "ess_frac",
                  "mean_abs_log_ratio")  # fmt: skip
    if are_logprobs and absd.size:
        out.update(_ratio_metrics(t, r, clip_eps))
    else:
        out.update(dict.fromkeys(ratio_keys))
    return out


def _ratio_metrics(trainer: np.ndarray, rollout: np.ndarray, clip_eps: float) -> dict[str, Any]:
    """The ratio metrics, from `jengine.rl.metrics` when it is importable (else numpy, same
    definitions). Tokens whose two values are equal (both -inf included) count as r = 0."""
    same = trainer == rollout
    t = np.where(same, 0.0, trainer).astype(np.float32)
    r = np.where(same, 0.0, rollout).astype(np.float32)
    try:
        from jengine.rl import metrics as rl_metrics
    except ImportError:
        rl_metrics = None
    if rl_metrics is not None:
        m = rl_metrics.to_host(
            rl_metrics.mismatch_metrics(t, r, eps_low=clip_eps, eps_high=clip_eps)
        )
        w = np.exp(t.astype(np.float64) - r)
        return {
            "ratio_mean": m["ratio_mean"], "ratio_min": float(w.min()), "ratio_max": m["ratio_max"],
            "k1": m["k1"], "k3": m["k3"], "clip_frac": m["clip_frac"], "ess": m["ess"],
            "ess_frac": m["ess_frac"], "mean_abs_log_ratio": m["mean_abs_log_ratio"],
        }  # fmt: skip
    lr = t.astype(np.float64) - r
    w = np.exp(lr)
    ess = float(w.sum() ** 2 / np.sum(w**2)) if np.sum(w**2) > 0 else 0.0
    return {
        "ratio_mean": float(w.mean()), "ratio_min": float(w.min()), "ratio_max": float(w.max()),
        "k1": float(np.mean(-lr)), "k3": float(np.mean(w - lr - 1)),
        "clip_frac": float(np.mean((w < 1 - clip_eps) | (w > 1 + clip_eps))),
        "ess": ess, "ess_frac": ess / w.size, "mean_abs_log_ratio": float(np.mean(np.abs(lr))),
    }  # fmt: skip


def parity_report(
    model,
    outputs: Sequence[Any],
    prompts: Sequence[Sequence[int]] | None,
    sampling_params,
    *,
    numerics,
    logprobs_mode: str = "processed_logprobs",
    rollout_logprobs_mode: str | None = None,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Scores a rollout's tokens with `jengine.score` and compares them with its logprobs.

    Args:
      model: the `Model` that produced the rollout (its current params).
      outputs: the engine's `RequestOutput`s (token_ids, logprobs), or `rl.Trajectory`s: each
        scored as one row (its prompt, then every turn), its model tokens compared.
      prompts: the prompt token ids, one per output; None takes `output.prompt_token_ids`.
      sampling_params: one `SamplingParams` or one per output, as generated (None with
        trajectories: each trajectory's own).
      numerics: the trainer side's `jengine.Numerics`: `engine.numerics` for the engine's own
        bits, or another value for an ablation (e.g. `engine.numerics.replace(
        lm_head_dtype="bfloat16")` shows what a trainer with a bf16 head sees).
      logprobs_mode: what the trainer side scores.
      rollout_logprobs_mode: what the rollout returned (default: `logprobs_mode`).
      batch_size: sequences per `score` call.
    Returns:
      `mismatch_metrics(...)` plus `settings` (the trainer side's numerics and logprobs_mode),
      and `routing_mismatches` (tokens routed to other experts by the trainer side) when every
      output carries `routed_experts` (a mixture-of-experts rollout with
      `EngineConfig(return_routed_experts=True)`).
    """
    import jengine
    from jengine.scoring import per_sequence

    if prompts is None:
        prompts = [o.prompt_token_ids for o in outputs]
    if len(prompts) != len(outputs):
        raise ValueError(f"{len(prompts)} prompts but {len(outputs)} outputs")
    trajectories = bool(outputs) and hasattr(outputs[0], "loss_mask")
    if trajectories:  # a row per trajectory; its model tokens (mask) are compared
        if sampling_params is None:
            sampling_params = [t.sampling_params for t in outputs]
        completions = [t.tokens[len(p) :] for t, p in zip(outputs, prompts)]
        masks = [t.loss_mask[len(p) :] for t, p in zip(outputs, prompts)]
        rollout = [t.logprobs[len(p) :][m] for t, p, m in zip(outputs, prompts, masks)]
    else:
        completions = [list(o.token_ids) for o in outputs]
        rollout = [np.asarray(o.logprobs, np.float32) for o in outputs]
    per_seq = per_sequence(sampling_params, len(outputs))
    trainer: list[np.ndarray] = []
    for start in range(0, len(outputs), batch_size):
        sl = slice(start, start + batch_size)
        trainer += list(jengine.score(
            model, [list(p) for p in prompts[sl]], completions[sl], per_seq[sl],
            numerics=numerics, logprobs_mode=logprobs_mode,
        ))  # fmt: skip
    if trajectories:
        trainer = [t[m] for t, m in zip(trainer, masks)]
    are_logprobs = {logprobs_mode, rollout_logprobs_mode or logprobs_mode} <= set(LOGPROB_MODES)
    report = mismatch_metrics(trainer, rollout, are_logprobs=are_logprobs)
    report["settings"] = {"logprobs_mode": logprobs_mode, **dataclasses.asdict(numerics)}
    if outputs and all(getattr(o, "routed_experts", None) is not None for o in outputs):
        report["routing_mismatches"] = _routing_mismatches(model, outputs, prompts, per_seq,
                                                           numerics)  # fmt: skip
    return report


def _routing_mismatches(model, outputs, prompts, per_seq, numerics) -> int:
    """Tokens whose rollout `routed_experts` differ from the routing the trainer-side scorer
    (`rl.token_logprobs(return_routing=True)`) used for them, in some sparse layer or rank."""
    from jengine import rl

    packed = rl.pack([list(p) for p in prompts], [list(o.token_ids) for o in outputs])
    _, routing = rl.token_logprobs(
        model.params, model.config, packed["tokens"], packed["prompt_lens"],
        packed["completion_lens"], sampling_params=per_seq, numerics=numerics,
        return_routing=True)  # fmt: skip
    routing = np.asarray(routing)
    return sum(int(np.any(routing[b, len(p) - 1 : len(p) - 1 + len(o.token_ids)]
                          != o.routed_experts, axis=(-2, -1)).sum())
               for b, (p, o) in enumerate(zip(prompts, outputs)))  # fmt: skip


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if value == 0.0 or math.isinf(value) or math.isnan(value):
            return str(value)
        return f"{value:.6g}" if abs(value) >= 1e-4 else f"{value:.3e}"
    return str(value)


def format_parity_report(report: dict[str, Any], keys: Iterable[str] | None = None) -> str:
    """A human-readable block of `parity_report`'s metrics, one per line."""
    keys = list(keys) if keys is not None else [
        "num_sequences", "num_tokens", "bitwise_equal", "sequences_bitwise_equal", "max_abs_diff",
        "mean_abs_diff", "rms_diff", "mean_diff", "non_finite_diffs", "ratio_mean", "ratio_min",
        "ratio_max", "k1", "k3", "clip_frac", "ess_frac", "first_mismatch",
    ] + (["routing_mismatches"] if "routing_mismatches" in report else [])  # fmt: skip
    lines = []
    for key in keys:
        value = report.get(key)
        if key == "bitwise_equal":
            value = f"{report['bitwise_equal']} / {report['num_tokens']}"
        lines.append(f"  {key:<24} {_fmt(value)}")
    return "\n".join(lines)
