"""Mixture-of-experts model step times on this CPU: a decode step and a prefill step of
Qwen3-30B-A3B's shape scaled down, invariant vs fast numerics, and the same model with dense
layers of the experts' active width for scale.

    python benchmarks/moe_step_bench.py [--scale 8] [--layers 2] [--reps 5] [--out FILE.json]

Shape: `qwen3-30b-a3b` with hidden, intermediate, expert width, heads and vocabulary divided by
--scale (8: hidden 256, 128 experts of 96, top-8, 4 heads of 128, vocabulary 18992), --layers
layers, bf16. Decode: 16 sequences of one token at position 255; prefill: one 256-token chunk.
Each entry is the best of --reps calls of the jitted forward (params, pages, plan -> logits; no
sampling) after a warm-up, the entries of one step interleaved (`kernel_bench._best_ms`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax

from benchmarks.kernel_bench import _best_ms
from jengine import (
    ModelConfig,
    SamplingParams,
    init_params,
    sampling,  # noqa: F401  (registers the plan types as pytrees)
)
from jengine import plan as plan_lib
from jengine.config import Numerics
from jengine.models.transformer import empty_kv_cache, forward

PAGE_SIZE, CONTEXT, DECODE_SEQS, PREFILL = 16, 256, 16, 256


def scaled(scale: int, layers: int) -> ModelConfig:
    c = ModelConfig.named("qwen3-30b-a3b")
    return c.replace(hidden_size=c.hidden_size // scale, intermediate_size=c.intermediate_size // scale,
                     moe_intermediate_size=c.moe_intermediate_size // scale,
                     num_heads=c.num_heads // scale, num_kv_heads=max(1, c.num_kv_heads // scale),
                     vocab_size=c.vocab_size // scale, num_layers=layers, eos_token_ids=(),
                     bos_token_id=None)  # fmt: skip


def plans() -> dict[str, plan_lib.StepPlan]:
    pages = CONTEXT // PAGE_SIZE
    sp = SamplingParams()
    decode = [plan_lib.Chunk([7], CONTEXT - 1, range(s * pages, (s + 1) * pages),
                             [plan_lib.Row(0, sp, 0, CONTEXT)]) for s in range(DECODE_SEQS)]
    prefill = [plan_lib.Chunk([7] * PREFILL, 0, range(pages), [plan_lib.Row(PREFILL - 1, sp, 0, PREFILL)])]
    no_slot = DECODE_SEQS * pages * PAGE_SIZE
    return {
        "decode": plan_lib.build(decode, PAGE_SIZE, pages).padded(DECODE_SEQS, DECODE_SEQS, DECODE_SEQS, no_slot),
        "prefill": plan_lib.build(prefill, PAGE_SIZE, pages).padded(PREFILL, 1, 1, no_slot),
    }  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=8)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    moe = scaled(args.scale, args.layers)
    active = moe.num_experts_per_tok * moe.moe_intermediate_size
    dense = moe.replace(num_experts=0, num_experts_per_tok=0, moe_intermediate_size=0,
                        norm_topk_prob=False, intermediate_size=active)  # fmt: skip
    models = {"moe": moe, f"dense {active}": dense}
    params = {k: init_params(c, seed=0, dtype="bfloat16") for k, c in models.items()}
    kv = empty_kv_cache(moe, DECODE_SEQS * CONTEXT // PAGE_SIZE, PAGE_SIZE, "bfloat16")
    rows = []
    for step, p in plans().items():
        fns, names = [], []
        for name, c in models.items():
            for mode in ("invariant", "fast"):
                numerics = Numerics(mode=mode).resolved()
                fns.append(jax.jit(lambda w, kv, p, c=c, n=numerics: forward(w, c, p, kv, n)[0]))
                names.append((name, mode))
        times = [_best_ms([fn], (params[name], kv, p), args.reps)[0] for fn, (name, _) in zip(fns, names)]
        for (name, mode), ms in zip(names, times):
            rows.append(dict(step=step, model=name, numerics=mode, ms=round(ms, 2)))
            print(f"{step:8s} {name:12s} {mode:10s} {ms:9.2f} ms", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": platform.processor() or platform.machine(), "scale": args.scale,
                       "layers": args.layers, "rows": rows}, f, indent=2)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
