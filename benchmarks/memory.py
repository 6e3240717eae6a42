"""Memory: KV pages held at peak vs a contiguous max-length cache for the RL workload, and the
peak host memory (RSS growth) while loading a checkpoint, vs one copy of the weights.

    python benchmarks/memory.py                       # SmolLM2 shape, 8 prompts x 4 samples, GGUF load
    python benchmarks/memory.py --checkpoint /path/to/hf_dir_or.gguf

The page count depends on the workload's lengths and prefix sharing only, so the KV part runs the
workload (random-id prompts, 16-96 tokens) on the tiny random model and reports bytes for the
SmolLM2 shape (--bytes-model); --real runs SmolLM2 itself with chat prompts and EOS. Writes benchmarks/results/memory.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import bench


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="model that runs the workload (page use depends on lengths only)")
    ap.add_argument("--bytes-model", default="smollm2-135m", help="shape whose KV bytes per token are reported")
    ap.add_argument("--real", action="store_true", help="SmolLM2 real weights (EOS ends samples)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=256)
    ap.add_argument("--numerics", default="fast", help="numerics don't change page use; fast compiles quicker")
    ap.add_argument("--checkpoint", help="checkpoint for the load test (default: the SmolLM2 GGUF)")
    ap.add_argument("--skip-kv", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    out_path = args.out or os.path.join(ROOT, "benchmarks", "results", "memory.json")
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    res = {"machine": bench.machine(), "args": vars(args), "kv": [], "load": []}
    if not args.skip_kv:
        model = bench.smollm2()[0] if args.real else bench.random_model(args.model)
        tok = bench._tokenizer_for(model) if args.real else None
        for mixed in (False, True):
            wl = bench.rl_workload(model.config.vocab_size, num_prompts=args.prompts, group=args.group,
                                   max_tokens=args.max_tokens, lengths="mixed" if mixed else "uniform", seed=0, tokenizer=tok)
            r, _ = bench.run_jengine(model, wl, numerics=args.numerics, max_model_len=args.max_model_len)
            from jengine.config import ModelConfig

            m = bench.kv_pages_vs_contiguous(r, wl, model, args.max_model_len,
                                             bytes_config=ModelConfig.named(args.bytes_model))
            m["workload"] = wl.name
            m["bytes_for"] = args.bytes_model
            m["run_on"] = "smollm2 real weights" if args.real else args.model
            print(json.dumps(m), flush=True)
            res["kv"].append(m)
        del model
    ckpt = args.checkpoint
    if ckpt is None:
        from jengine.models.loading import smollm2_gguf_path

        ckpt = smollm2_gguf_path()
    if ckpt:
        for dtype in ("float32", "bfloat16"):
            r = bench.load_memory(ckpt, dtype)
            print(json.dumps(r), flush=True)
            res["load"].append(r)
    with open(out_path, "w") as f:
        json.dump(res, f, indent=2)
    print(bench.table("Memory: KV pages vs contiguous", res["kv"]))
    print(bench.table("Memory: host RSS while loading", res["load"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
