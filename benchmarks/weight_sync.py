"""Weight syncs: `Engine.update_weights` (validate + place + swap) against copying the same tree
on the same devices, for the engine's own layout and for a trainer's layout that must be
resharded; and the pause an update imposes on generation.

    python benchmarks/weight_sync.py                       # SmolLM2 and Gemma-3-270M (GGUF)
    python benchmarks/weight_sync.py --models smollm2 --repeats 5

Each model runs in a fresh process with 4 CPU devices (XLA_FLAGS). Rows:
  same layout   params already laid out like the engine's (a trainer that shares its layout):
                update_weights vs a device copy of the tree (`jnp.copy` of every leaf).
  resharded     params on a 1-D ('fsdp',) mesh over all 4 devices, each leaf split on its first
                axis after the stacked layers where it divides, into the engine's
                tensor-parallel layout (tp=3 for SmolLM2's 9 heads, tp=4 for Gemma's): vs a device
                copy of the FSDP tree. Where the engine uses fewer devices (SmolLM2), also a
                trainer over the engine's own devices, and the floor of a move between device
                sets: the 4-device FSDP tree gathered onto one device with `jax.device_put`.
  pause         an engine decoding 16 sequences: the time between two steps that an update
                (mode keep) takes, against the median step.
Seconds are the median of --repeats after one untimed call (the reshard programs compile
once). Writes JSON to benchmarks/results/weight_sync.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TP = {"smollm2": 3, "gemma3-270m": 4}


def _median_seconds(fn, repeats: int) -> float:
    fn()  # compiles, first transfer
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def worker(name: str, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from jengine import Engine, EngineConfig, SamplingParams, load_model

    model = load_model(name)
    gb = sum(x.nbytes for x in jax.tree_util.tree_leaves(model.params)) / 1e9
    copy = jax.jit(lambda t: jax.tree_util.tree_map(jnp.copy, t))
    rows = []

    def row(layout, update, baseline, engine_devices):
        u = _median_seconds(update, repeats)
        c = _median_seconds(lambda: jax.block_until_ready(copy(baseline)), repeats)
        rows.append({"model": name, "layout": layout, "GB": round(gb, 3),
                     "engine_devices": engine_devices, "update_s": round(u, 4),
                     "update_GB_per_s": round(gb / u, 2), "copy_s": round(c, 4),
                     "copy_GB_per_s": round(gb / c, 2), "ratio": round(u / c, 2)})
        print(json.dumps(rows[-1]), flush=True)

    base = dict(max_model_len=128, max_num_seqs=16, max_num_batched_tokens=64, num_pages=160)
    one = Engine(model, EngineConfig(**base))
    same = copy(one.runner.params)
    row("same layout (1 device)", lambda: one.update_weights(same), same, 1)
    tp = TP.get(name, 2)
    engine = Engine(model, EngineConfig(tensor_parallel_size=tp, **base))
    same = copy(engine.runner.params)
    row(f"same layout (tp={tp})", lambda: engine.update_weights(same), same, tp)

    def fsdp_tree(devices):
        fsdp = Mesh(np.asarray(devices, dtype=object), ("fsdp",))

        def put(x):
            axis = 1 if x.ndim == 3 else 0
            spec = P(*[None] * axis, "fsdp") if x.shape[axis] % len(devices) == 0 else P()
            return jax.device_put(x, NamedSharding(fsdp, spec))

        return jax.tree_util.tree_map(put, model.params)

    devices = jax.devices()
    trainer = fsdp_tree(devices)
    row(f"resharded (fsdp over {len(devices)} -> tp={tp})", lambda: engine.update_weights(trainer),
        trainer, tp)
    if tp < len(devices):  # the engine on a subset: also a trainer over the engine's own devices
        one_device = jax.sharding.SingleDeviceSharding(devices[0])
        wide = trainer
        gather = lambda: jax.block_until_ready(jax.device_put(wide, one_device))  # noqa: E731
        trainer = fsdp_tree(devices[:tp])
        row(f"resharded (fsdp over the engine's {tp} -> tp={tp})",
            lambda: engine.update_weights(trainer), trainer, tp)
        rows.append({"model": name, "layout": f"floor: fsdp over {len(devices)} gathered onto 1 "
                     "device (device_put)", "GB": round(gb, 3),
                     "update_s": round(_median_seconds(gather, repeats), 4)})
        print(json.dumps(rows[-1]), flush=True)

    # the pause an in-flight update imposes: steps of a decoding engine, an update in between
    rng = np.random.default_rng(0)
    for p in range(16):
        one.add_request(list(map(int, rng.integers(3, model.config.vocab_size, 24))),
                        SamplingParams(max_tokens=40, ignore_eos=True, seed=p))
    for _ in range(4):
        one.step()  # prefill and first compiles
    steps = []
    for _ in range(8):
        t = time.perf_counter()
        one.step()
        steps.append(time.perf_counter() - t)
    new = copy(one.runner.params)
    t = time.perf_counter()
    one.update_weights(new, mode="keep")
    pause = time.perf_counter() - t
    t = time.perf_counter()
    one.step()
    after = time.perf_counter() - t
    rows.append({"model": name, "layout": "pause (1 device, 16 decoding)",
                 "median_step_s": round(statistics.median(steps), 4),
                 "update_pause_s": round(pause, 4), "next_step_s": round(after, 4),
                 "pause_in_steps": round(pause / statistics.median(steps), 2)})
    print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2,gemma3-270m")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.worker:
        print("JSON" + json.dumps(worker(args.worker, args.repeats)), flush=True)
        return 0
    from benchmarks import bench

    res = {"machine": bench.machine(), "args": vars(args), "rows": []}
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    for name in args.models.split(","):
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", name,
                            "--repeats", str(args.repeats)], cwd=ROOT, env=env,
                           capture_output=True, text=True, check=False)
        line = [x for x in p.stdout.splitlines() if x.startswith("JSON")]
        if not line:
            print(p.stdout[-2000:], p.stderr[-3000:], file=sys.stderr)
            return 1
        res["rows"] += json.loads(line[-1][4:])["rows"]
    print(bench.table("Weight sync", res["rows"]))
    bench.write_results(res, args.out, "weight_sync.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
