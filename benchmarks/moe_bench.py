"""Cost of the batch-invariant expert kernel on CPU (`moe.cpu`, what `Numerics(backend="cpu")` runs)
against two plain-XLA baselines: every expert on every token (dense, then each token's k
weighted), and `moe.reference`, the same grouping through `jax.lax.ragged_dot`.

    python benchmarks/moe_bench.py [--reps 5] [--scale 8] [--out results/moe_bench.json]

Shape: a Qwen3-30B-A3B sparse layer (hidden 2048, 128 experts of 768, top-8, renormalised) with
hidden and expert width divided by --scale (8: hidden 256, experts of 96), bf16 activations and
weights; tokens T in (1, 16, 64, 256), routed by a random router through `ops.route`. Each entry
is the best of --reps calls of the jitted function after a warm-up call, the three calls
interleaved (`kernel_bench._best_ms`); ratios are baseline / invariant (above 1: the invariant
kernel is faster).
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
import jax.numpy as jnp
import numpy as np

from benchmarks.kernel_bench import _best_ms, _normal
from jengine.config import Numerics
from pallas_kernels import moe, ops

HIDDEN, INTER, EXPERTS, TOP_K = 2048, 768, 128, 8  # Qwen3-30B-A3B
TOKENS = (1, 16, 64, 256)


def dense(x, expert_ids, weights, w_gate, w_up, w_down):
    """[T, H]: all E experts on all T tokens (three batched XLA dots), each token's k combined."""
    gate = jnp.einsum("th,eih->tei", x, w_gate, preferred_element_type=jnp.float32)
    up = jnp.einsum("th,eih->tei", x, w_up, preferred_element_type=jnp.float32)
    y = jnp.einsum("tei,ehi->teh", moe.swiglu(gate, up, x.dtype), w_down,
                   preferred_element_type=jnp.float32)  # fmt: skip
    picked = jnp.take_along_axis(y, expert_ids[:, :, None], axis=1)  # [T, k, H]
    return jnp.einsum("tkh,tk->th", picked, weights).astype(x.dtype)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="timed calls per entry")
    parser.add_argument("--scale", type=int, default=8, help="hidden and expert width divisor")
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    hidden, inter = HIDDEN // args.scale, INTER // args.scale
    rng = np.random.default_rng(0)
    ws = (_normal(rng, (EXPERTS, inter, hidden), jnp.bfloat16),
          _normal(rng, (EXPERTS, inter, hidden), jnp.bfloat16),
          _normal(rng, (EXPERTS, hidden, inter), jnp.bfloat16))  # fmt: skip
    router = _normal(rng, (EXPERTS, hidden), jnp.bfloat16)
    num = Numerics(backend="cpu")
    route = jax.jit(lambda x: ops.route(x, router, num, k=TOP_K, renormalize=True))
    fns = [jax.jit(moe.cpu), jax.jit(dense), jax.jit(moe.reference)]
    machine = f"{jax.devices()[0].platform}, {os.cpu_count()} cpus, {platform.machine()}"
    layer = f"hidden {hidden}, {EXPERTS} experts of {inter}, top-{TOP_K}, bf16"
    print(f"# jax {jax.__version__}, {machine}; {layer}; load {os.getloadavg()[0]:.1f}")
    print("| T | invariant ms | dense ms | ragged_dot ms | dense / inv | ragged / inv |")
    print("|---|---|---|---|---|---|")
    rows = []
    for tokens in TOKENS:
        x = _normal(rng, (tokens, hidden), jnp.bfloat16)
        call = (x, *route(x), *ws)
        inv, den, rag = _best_ms(fns, call, args.reps)
        print(
            f"| {tokens} | {inv:.2f} | {den:.2f} | {rag:.2f} | {den / inv:.1f} | {rag / inv:.1f} |"
        )
        rows.append({"tokens": tokens, "hidden": hidden, "moe_intermediate": inter,
                     "experts": EXPERTS, "top_k": TOP_K, "invariant_ms": round(inv, 3),
                     "dense_ms": round(den, 3), "ragged_dot_ms": round(rag, 3)})  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
