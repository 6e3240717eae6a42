"""Exactness fuzzer: random workloads, rollout == `score` == `rl.token_logprobs`, bit for bit.

Each example draws a model family and dtype, an engine configuration (page size, chunk size,
smallest bucket, prefix caching, a page pool small enough to preempt), a batch of requests
(prompt lengths, shared prefixes, sampling settings, lengths) and a number of turns (each turn's
prompt is the trajectory so far plus a few environment tokens). It generates with the engine and
checks every sampled token three ways. tests/test_exactness.py runs a fixed, bounded number of
examples in CI; run it for as long as you like with

    python -m tests.fuzz_exactness --minutes 60 [--seed S]

which prints each example and exits 1 at the first mismatch (hypothesis then shrinks it).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jengine
from jengine import Engine, EngineConfig, Model, ModelConfig, SamplingParams, init_params, rl

FAMILIES = {
    "llama-like": lambda: ModelConfig.named("tiny"),
    "qwen3-like": lambda: ModelConfig.named("tiny").replace(qk_norm=True, num_layers=3),
    "gemma3": lambda: ModelConfig.named("tiny-gemma3"),
    "gemma2-caps": lambda: ModelConfig.named("tiny-gemma3").replace(
        attn_logit_softcap=50.0, final_logit_softcap=5.0),
}
_MODELS: dict = {}


def model_for(family: str, dtype: str) -> Model:
    if (family, dtype) not in _MODELS:
        cfg = FAMILIES[family]().replace(dtype=dtype)
        _MODELS[family, dtype] = Model(cfg, init_params(cfg, seed=3))
    return _MODELS[family, dtype]


sampling = st.builds(
    dict,
    temperature=st.sampled_from([1.0, 0.9, 0.7, 1.3, 0.0]),
    top_k=st.sampled_from([0, 0, 5, 40]),
    top_p=st.sampled_from([1.0, 1.0, 0.9, 0.5]),
    min_p=st.sampled_from([0.0, 0.0, 0.05]),
)


@st.composite
def workloads(draw) -> dict:
    n = draw(st.integers(1, 6))
    shared = draw(st.integers(0, 20))  # a common prefix (prefix-cache hits)
    return dict(
        family=draw(st.sampled_from(sorted(FAMILIES))),
        dtype=draw(st.sampled_from(["float32", "float32", "bfloat16"])),
        page_size=draw(st.sampled_from([4, 8, 16])),
        max_num_batched_tokens=draw(st.sampled_from([32, 64, 256])),
        min_token_bucket=draw(st.sampled_from([2, 16])),
        prefix_caching=draw(st.booleans()),
        tight_pages=draw(st.booleans()),
        turns=draw(st.integers(1, 3)),
        shared=shared,
        prompt_lens=draw(st.lists(st.integers(1, 40), min_size=n, max_size=n)),
        max_tokens=draw(st.lists(st.integers(1, 40), min_size=n, max_size=n)),
        sampling=draw(st.lists(sampling, min_size=n, max_size=n)),
        seed=draw(st.integers(0, 2**16)),
    )


def check(w: dict) -> None:
    """Runs workload `w`; raises AssertionError naming the first token that differs."""
    model = model_for(w["family"], w["dtype"])
    vocab, page = model.config.vocab_size, w["page_size"]
    rng = np.random.default_rng(w["seed"])
    prefix = list(map(int, rng.integers(2, vocab, w["shared"])))
    trajs = [prefix + list(map(int, rng.integers(2, vocab, p))) for p in w["prompt_lens"]]
    first = [len(t) for t in trajs]
    longest = max(first) + w["turns"] * (max(w["max_tokens"]) + 4)
    need = sum(-(-(f + w["turns"] * (m + 4)) // page) for f, m in zip(first, w["max_tokens"]))
    pages = max(-(-longest // page) + 2, need // 2) if w["tight_pages"] else None
    engine = Engine(model, EngineConfig(
        max_model_len=longest + page, page_size=page, num_pages=pages, max_num_seqs=8,
        max_num_batched_tokens=w["max_num_batched_tokens"], min_token_bucket=w["min_token_bucket"],
        enable_prefix_caching=w["prefix_caching"]))  # fmt: skip
    params = [SamplingParams(**s) for s in w["sampling"]]
    model_cols = [[] for _ in trajs]  # per trajectory: (column of token_logprobs, rollout bits)
    for turn in range(w["turns"]):
        sp = [dataclasses.replace(p, max_tokens=m, ignore_eos=True, seed=w["seed"] + 7 * turn + i)
              for i, (p, m) in enumerate(zip(params, w["max_tokens"]))]  # fmt: skip
        outs = engine.generate([list(t) for t in trajs], sp)
        scored = jengine.score(model, trajs, [list(o.token_ids) for o in outs], sp,
                               numerics=engine.numerics)  # fmt: skip
        for i, (o, got) in enumerate(zip(outs, scored)):
            lp = np.asarray(o.logprobs, np.float32)
            assert np.array_equal(np.asarray(got).view(np.uint32), lp.view(np.uint32)), (
                f"turn {turn} request {i}: score != rollout at "
                f"{np.flatnonzero(np.asarray(got).view(np.uint32) != lp.view(np.uint32)).tolist()}")
            model_cols[i] += [(len(trajs[i]) + j - 1, lp[j]) for j in range(len(lp))]
            trajs[i] = trajs[i] + list(o.token_ids)
            if turn + 1 < w["turns"]:
                trajs[i] += list(map(int, rng.integers(2, vocab, 1 + turn)))  # environment tokens
    b = rl.pack([t[:f] for t, f in zip(trajs, first)], [t[f:] for t, f in zip(trajs, first)])
    values = np.asarray(rl.token_logprobs(model.params, model.config, b["tokens"], b["prompt_lens"],
                                          b["completion_lens"], sampling_params=params,
                                          numerics=engine.numerics))  # fmt: skip
    for i, cols in enumerate(model_cols):
        at = [c for c, want in cols if values[i, c].view(np.uint32) != np.float32(want).view(np.uint32)]
        assert not at, f"request {i}: rl.token_logprobs != rollout at columns {at}"
    engine.check_invariants()
    assert engine.stats["num_pages_free"] == engine.stats["num_pages"], "pages leaked"


def fuzz(max_examples: int, seed: int | None = None, verbose: bool = False) -> None:
    """Runs `check` on `max_examples` drawn workloads (derandomized when `seed` is None)."""

    @settings(max_examples=max_examples, deadline=None, derandomize=seed is None, database=None,
              suppress_health_check=list(HealthCheck), print_blob=True)  # fmt: skip
    @given(workloads())
    def run(w):
        if verbose:
            print({k: w[k] for k in ("family", "dtype", "page_size", "turns", "prompt_lens")},
                  flush=True)  # fmt: skip
        check(w)

    if seed is not None:
        run = __import__("hypothesis").seed(seed)(run)
    run()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="stop drawing after this long")
    ap.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random)")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else int(time.time())
    print(f"fuzzing for {args.minutes} min from seed {seed}", flush=True)
    stop, rounds = time.monotonic() + args.minutes * 60, 0
    while time.monotonic() < stop:  # rounds of 5 examples, one seed each
        fuzz(5, seed=seed + rounds, verbose=True)
        rounds += 1
    print(f"no mismatch found in {5 * rounds} examples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
