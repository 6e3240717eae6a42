"""Where the GRPO example's memory goes: peak resident memory of the example's process, and
XLA's own accounting of its compiled trainer programs.

    python benchmarks/grpo_memory.py                    # 2 steps of the documented run
    python benchmarks/grpo_memory.py --steps 3 --no-programs

1. Runs `python -m jengine.examples.grpo --steps N` in a fresh process and samples its resident
   set (VmRSS) every 50 ms: the peak, and the peak until the base model's evaluation is logged
   (model, engine, trainer state, greedy evaluation), before any training program runs.
2. In this process, compiles the example's gradient program (`_grads`) for its micro-batch shape
   with `rl.token_logprobs(remat=True)` and `remat=False` and reports XLA's memory analysis:
   arguments, outputs and temporaries (the activations kept for the backward pass live in the
   temporaries).
Writes JSON to benchmarks/results/grpo_memory.json (or --out).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MB = 2**20


def _rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def process_peak(steps: int, extra: list[str]) -> dict:
    """Peak RSS of the example's process, overall and before training starts."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "jengine.examples.grpo", "--steps", str(steps), "--eval_size",
               "16", "--out", out, *extra]
        log_path = os.path.join(out, "log.txt")
        t0 = time.perf_counter()
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                                    text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
            peak, before_train = 0.0, None
            while proc.poll() is None:
                peak = max(peak, _rss_mb(proc.pid) or 0.0)
                if before_train is None:
                    with open(log_path) as f:
                        before_train = peak if "base greedy accuracy" in f.read() else None
                time.sleep(0.05)
        with open(log_path) as f:
            log = f.read()
        if proc.returncode:
            raise SystemExit(log[-3000:])
    return {"steps": steps, "peak_rss_mb": round(peak), "peak_rss_before_training_mb":
            round(before_train or peak), "seconds": round(time.perf_counter() - t0, 1),
            "last_lines": log.strip().splitlines()[-3:]}


def program_memory(remat: bool) -> dict:
    """XLA's memory analysis of the example's `_grads` program at its micro-batch shape."""
    import jax
    import jax.numpy as jnp

    from jengine import rl
    from jengine.config import Numerics
    from jengine.examples import grpo

    model, tok = grpo.load(grpo.model_path("smollm2"))
    cfg = grpo.RunConfig()
    length = grpo.task_length(tok, cfg)
    b = cfg.micro_batch
    batch = {"tokens": jnp.zeros((b, length), jnp.int32),
             "prompt_lens": jnp.full((b,), length - cfg.max_tokens, jnp.int32),
             "completion_lens": jnp.full((b,), cfg.max_tokens, jnp.int32),
             "logprobs": jnp.zeros((b, length - 1), jnp.float32),
             "advantages": jnp.zeros((b,), jnp.float32)}
    numerics = Numerics().resolved()
    token_logprobs = functools.partial(rl.token_logprobs, remat=remat)
    original = grpo.rl.token_logprobs
    grpo.rl.token_logprobs = token_logprobs  # the example's program with this remat setting
    jax.clear_caches()  # trace it again: the traced program does not key on the setting
    try:
        lowered = grpo._grads.lower(
            model.params, model.params, batch, batch["logprobs"], jnp.float32(b * cfg.max_tokens),
            jnp.float32(cfg.temperature), config=model.config, numerics=numerics,
            correction="none", clip_eps=cfg.clip_eps, is_cap=cfg.is_cap)
        analysis = lowered.compile().memory_analysis()
    finally:
        grpo.rl.token_logprobs = original
    return {"remat": remat, "micro_batch": b, "length": length,
            "argument_mb": round(analysis.argument_size_in_bytes / MB),
            "output_mb": round(analysis.output_size_in_bytes / MB),
            "temp_mb": round(analysis.temp_size_in_bytes / MB)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--no-programs", action="store_true")
    ap.add_argument("--no-process", action="store_true")
    ap.add_argument("--out")
    args, extra = ap.parse_known_args(argv)
    from benchmarks import bench

    res = {"machine": bench.machine(), "args": vars(args)}
    if not args.no_programs:
        res["programs"] = [program_memory(r) for r in (True, False)]
        print(json.dumps(res["programs"]), flush=True)
    if not args.no_process:
        res["process"] = process_peak(args.steps, extra)
        print(json.dumps(res["process"]), flush=True)
    bench.write_results(res, args.out, "grpo_memory.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
