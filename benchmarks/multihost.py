"""Cost of multi-process decoding on this machine: the per-step divergence check and tensor
parallelism spanning two processes, against the same layout in one process; and host-local
engines (one per process, tp=2 over its own devices) against one global mesh (tp=2 within each
process x dp=2 across them) on the same total work.

    python benchmarks/multihost.py [--out PATH]

Starts two processes (coordinator on 127.0.0.1, 2 CPU devices each, gloo collectives) and, for
comparison, one process with 4 local devices; each runs the tiny model's decode workload with
tp=2 (across the processes, or within the one) and reports the median decode step time with
`check_divergence` on and off, and the time of the digest all-gather alone. On 2 CPU cores the 4
devices share the cores and gloo runs over loopback: the absolute figures say little about a TPU
pod (see RESULTS.md for what the cost model predicts there).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(pid: int, port: int) -> dict:
    import jax

    if pid < 0:  # one process, 4 local devices
        jax.config.update("jax_num_cpu_devices", 4)
    else:
        jax.config.update("jax_num_cpu_devices", 2)
        jax.distributed.initialize(f"127.0.0.1:{port}", 2, pid)
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh

    from jengine import Engine, EngineConfig, Model, ModelConfig, SamplingParams, init_params

    cfg = ModelConfig.named("tiny")
    model = Model(cfg, init_params(cfg, seed=0))
    devs = jax.devices()
    pair = [devs[0], devs[2]]  # across the processes (or two local devices)
    mesh = Mesh(np.asarray([pair], dtype=object), ("data", "model"))
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(2, 512, 32))) for _ in range(16)]
    sp = SamplingParams(max_tokens=24, ignore_eos=True, seed=1)
    out: dict = {"process": pid}
    for check in (True, False, True, False):
        engine = Engine(model, EngineConfig(tensor_parallel_size=2, max_num_seqs=16,
                                            max_num_batched_tokens=64, max_model_len=96,
                                            check_divergence=check), mesh=mesh)  # fmt: skip
        engine.warmup()
        for p in prompts:
            engine.add_request(p, sp)
        times = []
        while engine.has_unfinished_requests():
            t = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t)
        out.setdefault(f"step_ms_check_{check}", []).append(1000 * statistics.median(times[2:]))
    if pid >= 0:
        out.update(local_vs_global(model, prompts, sp))
        digest = np.zeros(9, np.uint32)
        multihost_utils.process_allgather(digest)
        t = time.perf_counter()
        for _ in range(200):
            multihost_utils.process_allgather(digest)
        out["allgather_ms"] = 1000 * (time.perf_counter() - t) / 200
    return {k: (round(min(v), 2) if isinstance(v, list) else v) for k, v in out.items()}


def _run(engine, prompts, sp) -> tuple[float, float]:
    """(median decode step ms, generated tokens per second) of `prompts` on a warmed engine."""
    engine.warmup(progress=False)
    for p in prompts:
        engine.add_request(p, sp)
    times, start = [], time.perf_counter()
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    wall = time.perf_counter() - start
    return 1000 * statistics.median(times[2:]), len(prompts) * sp.max_tokens / wall


def local_vs_global(model, prompts, sp) -> dict:
    """The same total work (this process's prompts on every process) two ways: a host-local
    engine per process, and one engine over both processes' devices (dp across them)."""
    import jax

    from jengine import Engine, EngineConfig
    from jengine.sharding import make_mesh

    base = dict(max_num_seqs=16, max_num_batched_tokens=64, max_model_len=96)
    local = Engine(model, EngineConfig(tensor_parallel_size=2, **base),
                   mesh=make_mesh(2, devices=jax.local_devices()))  # fmt: skip
    local_ms, local_tps = _run(local, prompts, sp)
    both = prompts + [p[::-1] for p in prompts]  # both processes' work, in one global engine
    glob = Engine(model, EngineConfig(tensor_parallel_size=2, data_parallel_size=2, **base))
    global_ms, global_tps = _run(glob, both, sp)
    return {"host_local_step_ms": round(local_ms, 2), "host_local_tokens_per_s": round(local_tps),
            "global_step_ms": round(global_ms, 2), "global_tokens_per_s": round(global_tps)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="also write the results as JSON here")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        print("JSON" + json.dumps(worker(args.worker, args.port)), flush=True)
        return 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, os.path.abspath(__file__), "--port", str(port), "--worker"]
    procs = [subprocess.Popen(cmd + [str(i)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
             for i in (0, 1)]  # fmt: skip
    two = [json.loads(next(x for x in p.communicate(timeout=900)[0].splitlines()
                           if x.startswith("JSON"))[4:]) for p in procs]  # fmt: skip
    one = subprocess.run(cmd + ["-1"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900, check=True).stdout  # fmt: skip
    one = json.loads(next(x for x in one.splitlines() if x.startswith("JSON"))[4:])
    result = {"two_processes": two, "one_process": one, "load": os.getloadavg()[0]}
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
