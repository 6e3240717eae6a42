"""Decode step time vs the memory-bandwidth roofline, and where a decode step's time goes.

    python benchmarks/decode_roofline.py                         # all four shapes, batch 8 and 32
    python benchmarks/decode_roofline.py --models smollm2-135m --batches 1,8,32,64 --numerics invariant,fast
    python benchmarks/decode_roofline.py --breakdown-only         # per-op profile (SmolLM2, batch 32)

Roofline: (bytes of all weights + every sequence's live K/V) / measured bandwidth (numpy copy,
read + write counted). The step timed is the engine's own compiled step (`Runner.run`, with the
host-side padding and the device->host copy of the sampled tokens) at `batch` decode tokens, each
at position --context. Random weights; a short max_model_len keeps the KV pool small.
Writes JSON to benchmarks/results/decode_roofline.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2-135m,qwen2.5-0.5b,qwen3-0.6b,llama-3.2-1b")
    ap.add_argument("--batches", default="8,32")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--numerics", default="invariant")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--min-token-buckets", default="16",
                    help="EngineConfig.min_token_bucket values to time (comma list)")
    ap.add_argument("--breakdown", default="smollm2-135m", help="models to profile per op ('' for none)")
    ap.add_argument("--breakdown-batch", type=int, default=32)
    ap.add_argument("--breakdown-only", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    out_path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "decode_roofline.json")
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    bw = bench.memory_bandwidth_gbs(1024)
    res = {"machine": bench.machine(), "bandwidth_gbs": round(bw, 2), "bandwidth_load": bench.loadavg(),
           "args": vars(args), "rows": [], "breakdown": []}
    print(f"bandwidth {bw:.2f} GB/s (load {res['bandwidth_load']})", flush=True)

    def save():
        with open(out_path, "w") as f:
            json.dump(res, f, indent=2, default=str)

    for name in args.models.split(",") if not args.breakdown_only else []:
        model = bench.random_model(name, args.dtype)
        for numerics in args.numerics.split(","):
            for min_tokens in map(int, args.min_token_buckets.split(",")):
                for b in map(int, args.batches.split(",")):
                    r = bench.roofline_row(name, model, b, args.context, bw, numerics, args.iters, min_tokens)
                    r["min_token_bucket"] = min_tokens
                    print(json.dumps(r), flush=True)
                    res["rows"].append(r)
                    save()
        del model
    for name in filter(None, args.breakdown.split(",")):
        model = bench.random_model(name, args.dtype)
        for numerics in ("invariant", "fast"):
            min_tokens = int(args.min_token_buckets.split(",")[-1])
            rows = bench.decode_breakdown(model, args.breakdown_batch, args.context, numerics, args.iters,
                                          min_tokens)
            for r in rows:
                r.update(model=name, min_token_bucket=min_tokens)
                print(json.dumps(r), flush=True)
            res["breakdown"] += rows
            save()
    print(bench.table(f"Decode step vs roofline (bandwidth {bw:.1f} GB/s)", res["rows"]))
    print(bench.table("Decode step breakdown", res["breakdown"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
