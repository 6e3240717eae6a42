"""Tensor-parallel scaling: generation throughput per tp on this host's devices, bitwise checked.

    python benchmarks/tp_scaling.py [tp ...] [--out PATH]   # default 1 2 4, 8 forced CPU devices

Every tp run uses the same `column_blocks` (default max(tp)), so their outputs are bitwise equal
(`same_tokens`); a tp=1, column_blocks=1 baseline shows what the blocks cost. All buckets are
compiled first, then `repeats` interleaved timed runs per configuration (median and best).
Sets XLA_FLAGS before jax is imported: run it as its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def tp_scaling(tp_sizes, *, num_requests=16, prompt_len=32, max_tokens=32, repeats=5):
    import numpy as np

    from jengine import Engine, EngineConfig, Model, ModelConfig, SamplingParams, init_params

    cfg = ModelConfig.named("tiny")
    blocks = max(tp_sizes)
    model = Model(cfg, init_params(cfg, seed=0))
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(2, cfg.vocab_size, prompt_len))) for _ in range(num_requests)]
    sp = SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True, seed=7)
    runs = [(tp, blocks) for tp in tp_sizes] + [(1, 1)]
    engines = []
    for tp, c in runs:
        engine = Engine(model, EngineConfig(
            tensor_parallel_size=tp, column_blocks=c, max_num_seqs=num_requests,
            max_num_batched_tokens=max(64, num_requests), max_model_len=prompt_len + max_tokens + 16,
            enable_prefix_caching=False,
        ))  # fmt: skip
        engine.warmup()
        engines.append(engine)
    times = [[] for _ in runs]  # interleaved: a noisy host slows every configuration alike
    tokens = [None] * len(runs)
    for _ in range(repeats):
        for i, engine in enumerate(engines):
            t0 = time.perf_counter()
            outs = engine.generate(prompts, sp, progress=False)
            times[i].append(time.perf_counter() - t0)
            tokens[i] = [o.token_ids for o in outs]
    rows = []
    for (tp, c), ts, toks in zip(runs, times, tokens):
        n = sum(len(t) for t in toks)
        best, median = min(ts), float(np.median(ts))
        rows.append({
            "tp": tp, "column_blocks": c, "best_s": round(best, 3), "median_s": round(median, 3),
            "tokens": n, "tokens_per_s_best": round(n / best, 1),
            "tokens_per_s_median": round(n / median, 1),
            "same_tokens": (toks == tokens[0]) if c == blocks else None,
        })  # fmt: skip
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tp", nargs="*", type=int, default=[1, 2, 4])
    ap.add_argument("--out", help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    if "jax" in sys.modules:
        raise RuntimeError("run as its own process: jax must not be initialised yet")
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    rows = tp_scaling(args.tp)
    print("model: tiny; 16 requests x (32 prompt + 32 new), 8 forced CPU devices")
    print("| tp | column_blocks | tokens/s (median) | tokens/s (best) | bitwise same tokens |")
    print("|---|---|---|---|---|")
    for r in rows:
        same = "n/a (other numerics)" if r["same_tokens"] is None else r["same_tokens"]
        print(f"| {r['tp']} | {r['column_blocks']} | {r['tokens_per_s_median']} | "
              f"{r['tokens_per_s_best']} | {same} |")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
