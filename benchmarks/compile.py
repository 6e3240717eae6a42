"""Compile behaviour: compilations and compile time for warmup and for a many-request workload;
time to first token cold (first request in a fresh process: includes compilation) and warm.

    python benchmarks/compile.py                               # tiny model, 500 requests
    python benchmarks/compile.py --model smollm2-135m --requests 100

Each configuration runs in a fresh subprocess (jit caches are per process, so "cold" is cold).
Writes JSON to benchmarks/results/compile_<model>.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--numerics", default="invariant,fast")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--budget", type=int, default=512, help="max_num_batched_tokens (sets the bucket table)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
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
