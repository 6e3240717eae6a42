"""Load test: many requests, random lengths and sampling params, random aborts and weight updates
interleaved, on a deliberately small KV pool. Nothing may be lost.

    python benchmarks/load_test.py --n 2000          # prints the figures as one line (and JSON)

Checks (raises AssertionError on a violation):
  * every request finishes exactly once, with a valid finish_reason;
  * no page leaks once drained (and the allocator's books balance after every step);
  * a sample of the requests that were not aborted and ran entirely under one policy version
    (added and finished with no update in between) give bitwise the same tokens and logprobs as
    the same request run alone on a fresh engine holding those weights;
  * compilations <= the bucket table size.
`tests/test_load.py` runs `run_load` at CI size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jengine import EngineConfig, Model, ModelConfig, SamplingParams, init_params  # noqa: E402
from jengine.engine import FINISH_REASONS, Engine  # noqa: E402
from jengine.runner import model_step  # noqa: E402


def _jit_cache_size() -> int:
    """XLA executables jit holds for the step function (catches recompiles the engine's own
    `compilations` counter cannot see, e.g. after a weight update changes an argument's placement)."""
    return model_step._cache_size() if hasattr(model_step, "_cache_size") else 0

# A small pool: 12 pages of 4 tokens for up to 4 running sequences of up to 48 tokens each, so
# requests constantly wait for pages and running ones get preempted.
SMALL_POOL = dict(num_pages=12, page_size=4, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32)
MODES = ("keep", "recompute", "abort")


def perturbed(params, seed: int, scale: float = 1e-3):
    """params + scale * N(0, 1): new finite weights near the old ones."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [x + scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    )


def make_requests(n: int, vocab: int, rng: np.random.Generator, max_tokens_hi: int = 16):
    """n (prompt, SamplingParams) pairs; a third share one of four prefixes (prefix-cache hits)."""
    prefixes = [list(map(int, rng.integers(2, vocab, 12))) for _ in range(4)]
    out = []
    for i in range(n):
        suffix = list(map(int, rng.integers(2, vocab, int(rng.integers(1, 20)))))
        prompt = (prefixes[int(rng.integers(4))] + suffix) if rng.random() < 0.35 else suffix
        sp = SamplingParams(
            temperature=float(rng.choice([0.0, 0.6, 1.0, 1.3])),
            top_k=int(rng.choice([0, 0, 20])),
            top_p=float(rng.choice([1.0, 1.0, 0.9])),
            min_p=float(rng.choice([0.0, 0.0, 0.05])),
            max_tokens=int(rng.integers(1, max_tokens_hi + 1)),
            seed=int(rng.integers(0, 2**31)),
            stop_token_ids=tuple(int(t) for t in rng.integers(2, vocab, int(rng.integers(0, 3)))),
            ignore_eos=bool(rng.random() < 0.5),
        )
        out.append((prompt, sp))
    return out


def run_load(
    model: Model,
    n: int = 120,
    *,
    seed: int = 0,
    num_updates: int = 4,
    abort_prob: float = 0.05,
    compare: int = 10,
    config: dict | None = None,
    verbose: bool = False,
) -> dict:
    cfg = EngineConfig(**(config or SMALL_POOL))
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    jit_before = _jit_cache_size()
    engine = Engine(model, cfg)
    versions = {0: model.params}  # policy version -> params
    requests = make_requests(n, model.config.vocab_size, rng)
    # arrivals: one request a step with probability 0.35, now and then a burst of 4 (a GRPO group);
    # updates are spread evenly over the arrival period
    expected_steps = int(n / 0.43)
    update_at = sorted(set(int(x) for x in np.linspace(0, expected_steps, num_updates + 2)[1:-1]))
    info: dict[str, dict] = {}
    outs: dict[str, object] = {}
    aborts = updates = 0

    def take(results):
        for out in results:
            rid = out.request_id
            assert rid in info, f"unknown request {rid} finished"
            assert rid not in outs, f"request {rid} finished twice"
            assert out.finish_reason in FINISH_REASONS, out.finish_reason
            info[rid]["finish_version"] = engine.policy_version
            outs[rid] = out

    next_req = 0
    steps = 0
    while next_req < n or engine.has_unfinished_requests():
        burst = 4 if rng.random() < 0.02 else int(rng.random() < 0.35)
        for _ in range(burst):
            if next_req >= n:
                break
            prompt, sp = requests[next_req]
            rid = engine.add_request(prompt, sp)
            info[rid] = dict(index=next_req, add_version=engine.policy_version)
            next_req += 1
        if updates < num_updates and steps >= update_at[updates]:
            mode = MODES[updates % len(MODES)]
            new = perturbed(model.params, 1000 + updates)
            version = engine.update_weights(new, mode=mode)
            versions[version] = new
            updates += 1
        if engine._seqs and rng.random() < abort_prob:
            victim = sorted(engine._seqs)[int(rng.integers(len(engine._seqs)))]
            out = engine.abort(victim)
            info[victim]["finish_version"] = engine.policy_version
            take([out])
            aborts += 1
        take(engine.step())
        steps += 1
        engine.check_invariants()
        assert steps < 200 * n + 1000, "livelock: the engine stopped making progress"
    wall = time.perf_counter() - start

    assert set(outs) == set(info), "a request never finished"
    leaked = engine.stats["num_pages"] - engine.stats["num_pages_free"]
    assert leaked == 0, f"{leaked} pages leaked"
    engine.check_invariants()
    stats = engine.stats
    assert stats["compilations"] <= stats["bucket_table_size"], stats
    jit_compiles = _jit_cache_size() - jit_before
    assert jit_compiles <= stats["bucket_table_size"], f"{jit_compiles} step executables compiled"

    # bitwise: not aborted, one policy version for its whole life
    clean = [
        rid
        for rid, out in outs.items()
        if out.finish_reason in ("stop", "length")
        and info[rid]["add_version"] == info[rid]["finish_version"]
    ]
    for rid in clean:
        assert set(outs[rid].policy_versions.tolist()) <= {info[rid]["add_version"]}
    sample = [clean[i] for i in sorted(rng.choice(len(clean), min(compare, len(clean)), replace=False))]
    equal = 0
    for rid in sample:
        prompt, sp = requests[info[rid]["index"]]
        v = info[rid]["add_version"]
        alone = Engine(Model(model.config, versions[v]), cfg).generate([prompt], sp)[0]
        got = outs[rid]
        same = alone.token_ids == got.token_ids and np.array_equal(alone.logprobs, got.logprobs)
        assert same, (rid, v, alone.token_ids, got.token_ids, alone.logprobs, got.logprobs)
        equal += same
    reasons = {r: sum(o.finish_reason == r for o in outs.values()) for r in FINISH_REASONS}
    result = dict(
        requests=n,
        finished_once=len(outs),
        aborts=aborts,
        aborted_total=reasons["aborted"],
        updates=updates,
        finish_reasons=reasons,
        pages_leaked=leaked,
        single_version=len(clean),
        compared=len(sample),
        bitwise_equal=equal,
        compilations=stats["compilations"],
        jit_compiles=jit_compiles,
        bucket_table_size=stats["bucket_table_size"],
        preemptions=stats["preemptions"],
        prefix_cache_hit_tokens=stats["prefix_cache_hit_tokens"],
        generated_tokens=stats["generated_tokens"],
        steps=stats["steps"],
        compile_seconds=stats["compile_seconds"],
        load_seconds=round(wall, 2),
        total_seconds=round(time.perf_counter() - start, 2),
    )
    return result


def summary(r: dict) -> str:
    return (
        f"load: requests={r['requests']} finished_once={r['finished_once']} aborts={r['aborts']} "
        f"(aborted total {r['aborted_total']}) updates={r['updates']} pages_leaked={r['pages_leaked']} "
        f"bitwise_equal={r['bitwise_equal']}/{r['compared']} (of {r['single_version']} single-version) "
        f"compilations={r['compilations']}(jit {r['jit_compiles']})/{r['bucket_table_size']} preemptions={r['preemptions']} "
        f"prefix_hit_tokens={r['prefix_cache_hit_tokens']} steps={r['steps']} "
        f"load_s={r['load_seconds']} total_s={r['total_seconds']}"
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=int(os.environ.get("JENGINE_LOAD_N", 2000)))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--updates", type=int, default=6)
    ap.add_argument("--abort-prob", type=float, default=0.05)
    ap.add_argument("--compare", type=int, default=10)
    ap.add_argument("--model", default="tiny", help="a shipped config name (random init)")
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args(argv)
    cfg = ModelConfig.named(args.model)
    model = Model(cfg, init_params(cfg, seed=0))
    r = run_load(
        model, args.n, seed=args.seed, num_updates=args.updates, abort_prob=args.abort_prob,
        compare=args.compare,
    )
    print(summary(r))
    print(json.dumps(r))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
