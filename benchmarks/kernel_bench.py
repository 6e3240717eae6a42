"""Cost of invariance on CPU: each op's fixed-tile CPU lowering (`Numerics(backend="cpu")`) against
its fast XLA counterpart (the op's plain-JAX `reference`), at SmolLM2-135M shapes.

    python benchmarks/kernel_bench.py [--reps 20]

Shapes: hidden 576, 9 heads over 3 kv heads of 64, intermediate 1536, vocab 49152; layer
activations and weights in bf16, the lm_head on fp32 hidden states (the engine's default);
rows M in (32, 64, 256). Attention: a decode step of 32 sequences with 240-272 keys each, and
one 512-token prefill chunk; bf16 pages of 16 tokens. Each entry is the best of --reps calls of
the jitted op after a warm-up call, the two lowerings' calls interleaved (best-of, because a
shared machine's load only ever adds time); ratio = invariant / reference.
"""

from __future__ import annotations

import argparse
import json
import functools
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import matmul, ragged_paged_attention, rms_norm

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE, VOCAB = 576, 9, 3, 64, 1536, 49152
ROWS = (32, 64, 256)
PAGE_SIZE = 16
EPS = 1e-5


def _best_ms(fns, args, reps: int) -> list[float]:
    """Best-of-`reps` wall time of each jitted fn, calls interleaved so both see the same load."""
    for fn in fns:
        jax.block_until_ready(fn(*args))  # compile and warm up
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            best[i] = min(best[i], time.perf_counter() - start)
    return [1e3 * t for t in best]


def _normal(rng, shape, dtype):
    return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)


def _attention_batch(rng, kv_lens, q_lens):
    """Pages for sequences with `kv_lens` keys; queries are each sequence's last `q_lens` positions."""
    pages_per_seq = -(-max(kv_lens) // PAGE_SIZE)
    num_pages = len(kv_lens) * pages_per_seq
    table = rng.permutation(num_pages).reshape(len(kv_lens), pages_per_seq).astype(np.int32)
    shape = (num_pages, PAGE_SIZE, KV_HEADS, HEAD_DIM)
    k_pages, v_pages = _normal(rng, shape, jnp.bfloat16), _normal(rng, shape, jnp.bfloat16)
    seq_ids = np.concatenate([np.full(q, s) for s, q in enumerate(q_lens)]).astype(np.int32)
    positions = np.concatenate([np.arange(n - q, n) for n, q in zip(kv_lens, q_lens)]).astype(
        np.int32
    )
    q = _normal(rng, (len(seq_ids), HEADS, HEAD_DIM), jnp.bfloat16)
    return q, k_pages, v_pages, jnp.asarray(table), jnp.asarray(seq_ids), jnp.asarray(positions)


def cases(rng):
    """(op, shape label, rows, reference, invariant cpu lowering, args)."""
    layers = {
        "matmul q/o": (HIDDEN, HIDDEN),
        "matmul mlp up": (HIDDEN, INTERMEDIATE),
        "matmul mlp down": (INTERMEDIATE, HIDDEN),
    }
    for rows in ROWS:
        for name, (k, n) in layers.items():
            args = _normal(rng, (rows, k), jnp.bfloat16), _normal(rng, (n, k), jnp.bfloat16)
            yield name, f"{k}x{n}", rows, matmul.reference, matmul.cpu, args
        args = (
            _normal(rng, (rows, HIDDEN), jnp.float32),
            _normal(rng, (VOCAB, HIDDEN), jnp.bfloat16),
        )
        yield "lm_head", f"{HIDDEN}x{VOCAB}", rows, matmul.reference, matmul.cpu, args
        args = _normal(rng, (rows, HIDDEN), jnp.bfloat16), _normal(rng, (HIDDEN,), jnp.bfloat16)
        norm = (
            functools.partial(rms_norm.reference, eps=EPS),
            functools.partial(rms_norm.cpu, eps=EPS),
        )
        yield "rms_norm", f"{HIDDEN}", rows, *norm, args
    kw = {"sm_scale": HEAD_DIM**-0.5}
    attention = (
        functools.partial(ragged_paged_attention.reference, **kw),
        functools.partial(ragged_paged_attention.cpu, **kw),
    )
    decode = _attention_batch(rng, kv_lens=rng.integers(240, 273, 32).tolist(), q_lens=[1] * 32)
    yield "attention decode", "32 seqs x ~256 keys", 32, *attention, decode
    prefill = _attention_batch(rng, kv_lens=[512], q_lens=[512])
    yield "attention prefill", "1 chunk of 512", 512, *attention, prefill


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=10, help="timed calls per entry")
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    rows_out = []
    print(
        f"# jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} cpus, {platform.machine()}"
    )
    header = f"| {'op':<18} | {'shape':<20} | {'M':>4} | {'reference ms':>12} | {'invariant ms':>12} | {'ratio':>5} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for op, shape, rows, reference, invariant, fn_args in cases(np.random.default_rng(0)):
        ref_ms, inv_ms = _best_ms([jax.jit(reference), jax.jit(invariant)], fn_args, args.reps)
        print(
            f"| {op:<18} | {shape:<20} | {rows:>4} | {ref_ms:>12.3f} | {inv_ms:>12.3f} | {inv_ms / ref_ms:>5.2f} |"
        )
        rows_out.append({"op": op, "shape": shape, "rows": rows, "reference_ms": round(ref_ms, 3),
                         "invariant_ms": round(inv_ms, 3)})  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows_out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
