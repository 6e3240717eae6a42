"""Multi-process SPMD decoding on JAX's multi-controller runtime, bitwise equal to one device.

Two processes on this machine (coordinator on 127.0.0.1, 2 CPU devices each, gloo collectives)
run tests/multihost_check.py; every process must return the same outputs, equal bit for bit to
`drive` run here on one device with the same column_blocks. Every subprocess has a timeout, so a
hang fails the test instead of stalling CI. The `documented` case runs README's call as written
(no mesh=) for several layouts in one pair of processes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from tests import multihost_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(case: str) -> list[tuple[int, dict | None, str, float]]:
    """Starts the two processes; returns per process (returncode, report, stderr, seconds)."""
    port = str(_free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    start = time.perf_counter()
    procs = [
        subprocess.Popen([sys.executable, "-u", "-m", "tests.multihost_check", case, str(i), port],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)  # fmt: skip
        for i in range(2)
    ]
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(1.0, TIMEOUT_S - (time.perf_counter() - start)))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{case}: a process hung for {TIMEOUT_S}s")
        lines = [line for line in out.splitlines() if line.startswith("{")]
        report = json.loads(lines[-1]) if lines else None
        results.append((p.returncode, report, err, time.perf_counter() - start))
    return results


@pytest.fixture(scope="module")
def one_device():
    """`drive` in this process on one device, with the same numerics (column_blocks)."""
    from jengine import Engine, EngineConfig, Model, ModelConfig, init_params

    cfg = ModelConfig.named("tiny")
    model = Model(cfg, init_params(cfg, seed=0))
    outputs, stats = multihost_check.drive(Engine(model, EngineConfig(**multihost_check.ENGINE)), model)
    assert stats["preemptions"] > 0 and stats["prefix_cache_hit_tokens"] > 0, stats
    return outputs


def one_process(case: str) -> dict:
    """The same case's mesh shape in one process (4 local CPU devices)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, "-m", "tests.multihost_check", case, "single"], cwd=ROOT,
                       env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
                       timeout=TIMEOUT_S, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])["outputs"]


@pytest.mark.parametrize("case", ["tp2", "dp2", "tp2dp2", "resharded"])
def test_every_process_returns_the_one_process_bits(case, one_device):
    results = run_processes(case)
    for code, report, err, _ in results:
        assert code == 0 and report is not None, err[-3000:]
        assert report["devices"] == 4
    first, second = (r[1]["outputs"] for r in results)
    assert first == second, "the processes returned different outputs"
    assert first == one_process(case)
    if case == "tp2":  # one replica: also one device's bits (tp changes nothing with the same C)
        assert first == one_device
    assert {o["finish"] for o in first.values()} >= {"aborted", "length"}
    assert any(2 in o["versions"] for o in first.values())  # both updates reached the engine
    if case == "tp2dp2":
        for _, report, _, _ in results:
            assert report["score_bitwise"] and report["token_logprobs_bitwise"]


def test_host_local_engines_step_alone_and_take_the_trainers_weights():
    """One engine per process over its own devices: the processes run different workloads with
    no step collective between them (no DivergenceError, no hang), weight updates arrive as
    global arrays of a trainer layout over both processes, and each process's outputs are
    bitwise those of the same engine alone in one process."""
    results = run_processes("local")
    for code, report, err, _ in results:
        assert code == 0 and report is not None, err[-3000:]
        assert "divergence" not in report and report["spans_processes"] is False
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, "-m", "tests.multihost_check", "local", "single"], cwd=ROOT,
                       env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
                       timeout=TIMEOUT_S, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    alone = json.loads(r.stdout.strip().splitlines()[-1])["outputs"]
    assert [report["outputs"] for _, report, _, _ in results] == alone
    assert alone[0] != alone[1]  # the two workloads differ
    assert all(2 in o["versions"] for o in alone[1].values() if o["finish"] != "aborted")


def test_the_documented_call_builds_a_mesh_over_every_process():
    """`Engine(model, EngineConfig(tensor_parallel_size=T, data_parallel_size=D))` with no mesh=:
    the mesh takes devices of both processes (tp across them, dp across them, tp2 x dp2), and
    every layout returns one device's bits with the same column_blocks (no weight updates, so dp
    changes no bit either); score and token_logprobs on the engine's mesh give the same bits."""
    from jengine import Engine, EngineConfig, Model, ModelConfig, init_params

    results = run_processes("documented")
    for pid, (code, report, err, _) in enumerate(results):
        assert code == 0 and report is not None, err[-3000:]
        assert f"no device of process {pid}" in report["layouts"].pop("foreign_mesh_error")
    first, second = (r[1]["layouts"] for r in results)
    assert first == second, "the processes returned different outputs"
    cfg = ModelConfig.named("tiny")
    model = Model(cfg, init_params(cfg, seed=0))
    prompts, params = multihost_check.workload(cfg.vocab_size)
    outs = Engine(model, EngineConfig(**multihost_check.DOCUMENTED_ENGINE)).generate(
        prompts, params, progress=False)  # fmt: skip
    one_device = [multihost_check.record(o) for o in outs]
    owners = {"4x1": [[0, 0, 1, 1]], "1x2": [[0], [1]], "2x2": [[0, 0], [1, 1]]}
    assert set(first) == {f"{tp}x{dp}" for tp, dp in multihost_check.DOCUMENTED} == set(owners)
    for layout, row in first.items():
        assert row["processes"] == owners[layout], layout  # which process owns each mesh device
        assert row["outputs"] == one_device, layout
        assert row["score_bitwise"] and row["token_logprobs_bitwise"], layout


def test_different_requests_raise_on_every_process():
    results = run_processes("diverge")
    for code, report, err, _ in results:
        assert code == 0 and report is not None, err[-3000:]
        assert "step plans differ" in report["divergence"], report
        assert "process 0" in report["divergence"] and "process 1" in report["divergence"]


def test_a_lost_process_ends_the_run_within_the_heartbeat_bound():
    (code0, report0, err0, t0), (code1, _, _, t1) = run_processes("kill")
    assert code1 == 17  # died on purpose mid-run
    assert code0 != 0 and report0 is None  # the survivor did not hang or return outputs
    assert "JAX distributed service detected fatal errors" in err0, err0[-3000:]
    # heartbeat timeout plus the time to notice it and shut down
    assert t0 - t1 < 6 * multihost_check.HEARTBEAT_TIMEOUT_S + 30, (t0, t1)
