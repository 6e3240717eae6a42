"""Load test at CI size (JENGINE_LOAD_N=2000 for the full run): N requests with random lengths and
sampling params, random aborts and several weight updates (keep / recompute / abort) interleaved,
on a deliberately small KV pool (12 pages of 4 tokens, 4 seats).

Proves: every request finishes exactly once with a valid finish_reason; no page leaks and the
allocator's books balance after every step; requests that were not aborted and ran entirely under
one policy version are bitwise the same request run alone on a fresh engine with those weights (a
sample of 10); compilations -- the engine's count and the step function's real jit cache growth --
stay within the bucket table. The logic lives in `benchmarks/load_test.py` (`run_load`)."""

from __future__ import annotations

import importlib.util
import os

_PATH = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "load_test.py"
)
_spec = importlib.util.spec_from_file_location("jengine_load_test", _PATH)
load_test = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(load_test)

N = int(os.environ.get("JENGINE_LOAD_N", "120"))


def test_nothing_lost_under_load(tiny_model):
    r = load_test.run_load(tiny_model, N, seed=0, num_updates=4, compare=10)
    print("\n" + load_test.summary(r))
    assert r["finished_once"] == N
    assert r["pages_leaked"] == 0
    assert r["updates"] == 4
    assert r["aborts"] > 0 and r["preemptions"] > 0 and r["prefix_cache_hit_tokens"] > 0
    assert r["compared"] == min(10, r["single_version"]) and r["compared"] >= 5
    assert r["bitwise_equal"] == r["compared"]
    assert r["compilations"] <= r["bucket_table_size"]
    assert r["jit_compiles"] <= r["bucket_table_size"]
