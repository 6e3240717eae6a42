"""Compile behaviour: compilations and compile time for warmup and for a many-request workload;
time to first token cold (first request in a fresh process: includes compilation) and warm.

    python benchmarks/compile.py                               # tiny model, 500 requests
    python benchmarks/compile.py --model smollm2-135m --requests 100
    python benchmarks/compile.py --depth 2,30                  # SmolLM2's shape at 2 and 30 layers
    python benchmarks/compile.py --demo smollm2,gemma3-270m    # `jengine demo` from a cold process

--depth: the first 16-token bucket's cold time to first token (compile + run) and every bucket's
compile seconds from `Engine.warmup(threads=1)`, for `--model`'s shape cut to each depth (random
weights). --demo: `python -m jengine demo --model=M` in a fresh process: load, compile and total
seconds from its report.

Each configuration runs in a fresh subprocess (jit caches are per process, so "cold" is cold).
Writes JSON to benchmarks/results/compile_<model>.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CHILD = r"""
import json, sys
from benchmarks import bench
name, numerics, requests, max_tokens, budget = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
model = bench.smollm2()[0] if name == "smollm2" else bench.random_model(name)
r = bench.compile_behaviour(model, num_requests=requests, max_tokens=max_tokens, numerics=numerics,
                            max_num_batched_tokens=budget)
print("JSON" + json.dumps(r))
"""

CHILD_DEPTH = r"""
import json, sys, time
import numpy as np
from jengine import Engine, EngineConfig, SamplingParams
from jengine.config import ModelConfig
from jengine.models.transformer import Model, init_params
name, layers = sys.argv[1], int(sys.argv[2])
cfg = ModelConfig.named(name).replace(num_layers=layers)
model = Model(cfg, init_params(cfg, 0))
engine_config = EngineConfig(max_model_len=256, max_num_seqs=16, max_num_batched_tokens=128)
prompt = [int(t) for t in np.random.default_rng(1).integers(3, cfg.vocab_size, 12)]
t = time.perf_counter()
Engine(model, engine_config).generate([prompt], SamplingParams(max_tokens=1, seed=0), progress=False)
ttft = time.perf_counter() - t
engine = Engine(model, engine_config)
t = time.perf_counter()
try:
    seconds = engine.warmup(threads=1, progress=False)
except TypeError:  # a jengine whose warmup() takes no arguments and returns a count
    engine.warmup(); seconds = {}
row = {"model": name, "layers": layers, "ttft_cold_16_token_bucket_s": round(ttft, 2),
       "warmup_s": round(time.perf_counter() - t, 2),
       "compile_s_per_bucket": {str(k[0]): round(v, 2) for k, v in seconds.items()}}
print("JSON" + json.dumps(row))
"""


def _child(code: str, *args: str) -> dict | None:
    p = subprocess.run([sys.executable, "-c", code, *args], check=False, capture_output=True,
                       text=True, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT})
    line = [x for x in p.stdout.splitlines() if x.startswith("JSON")]
    if not line:
        print(p.stdout[-2000:], p.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(line[-1][4:])


def depth_and_demo(args) -> int:
    from benchmarks import bench

    out_path = args.out or os.path.join(ROOT, "benchmarks", "results", "compile_depth.json")
    res = {"machine": bench.machine(), "args": vars(args), "depth": [], "demo": []}
    for layers in filter(None, (args.depth or "").split(",")):
        row = _child(CHILD_DEPTH, args.model, layers)
        if row is None:
            return 1
        print(json.dumps(row), flush=True)
        res["depth"].append(row)
    for name in filter(None, (args.demo or "").split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            report = os.path.join(tmp, "report.json")
            t = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "jengine", "demo", f"--model={name}",
                                f"--report_json={report}"], check=False, capture_output=True, text=True,
                               cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
            wall = time.perf_counter() - t
            if p.returncode:
                print(p.stderr[-3000:], file=sys.stderr)
                return 1
            with open(report) as f:
                r = json.load(f)
        row = {"model": name, "process_wall_s": round(wall, 1), "load_s": round(r["load_seconds"], 1),
               "compiled_steps": r["trace"]["compiled_steps"],
               "compile_s": r["trace"]["compile_seconds"], "demo_total_s": round(r["total_seconds"], 1)}
        print(json.dumps(row), flush=True)
        res["demo"].append(row)
    with open(out_path, "w") as f:
        json.dump(res, f, indent=2)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--numerics", default="invariant,fast")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--budget", type=int, default=512, help="max_num_batched_tokens (sets the bucket table)")
    ap.add_argument("--depth", help="comma-separated layer counts of --model's shape (e.g. 2,30)")
    ap.add_argument("--demo", help="comma-separated models for a cold `jengine demo`")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.depth or args.demo:
        return depth_and_demo(args)
    out_path = args.out or os.path.join(ROOT, "benchmarks", "results", f"compile_{args.model}.json")
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    from benchmarks import bench

    res = {"machine": bench.machine(), "args": vars(args), "rows": []}
    for numerics in args.numerics.split(","):
        p = subprocess.run([sys.executable, "-c", CHILD, args.model, numerics, str(args.requests), str(args.max_tokens),
                            str(args.budget)], check=False, capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT})
        line = [x for x in p.stdout.splitlines() if x.startswith("JSON")]
        if not line:
            print(p.stderr[-3000:], file=sys.stderr)
            return 1
        r = json.loads(line[-1][4:])
        print(json.dumps(r), flush=True)
        res["rows"].append(r)
        with open(out_path, "w") as f:
            json.dump(res, f, indent=2)
    print(bench.table("Compile", res["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
