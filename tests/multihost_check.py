"""One process of a multi-process jengine run (tests/test_multihost.py starts two of them).

    python -m tests.multihost_check CASE PROCESS_ID PORT
    python -m tests.multihost_check CASE single          # the same mesh shape in one process

Each process calls `jax.distributed.initialize` (the user's call, standard JAX), builds the
case's mesh over the global devices, runs the same engine calls as every other process and
prints one JSON line: the outputs (tokens, logprob bits, versions, finish reasons), or the error
it raised. `single` runs the same case in one process on 4 local CPU devices: the reference
(weight updates land at fixed steps, so a data-parallel run is compared with a data-parallel
one; without updates every layout gives one device's bits).

Cases (2 processes x 2 CPU devices; d(p, i) = device i of process p):
  tp2        tensor parallel over [d(0,0), d(1,0)]: one model split across the processes
  dp2        data parallel, one replica per process: [[d(0,0)], [d(1,0)]]
  tp2dp2     [[d(0,0), d(1,0)], [d(0,1), d(1,1)]]: tp and dp both span the processes; also
             scores the rollout with `jengine.score` and `rl.token_logprobs` on the same mesh
  resharded  tp2dp2 plus a weight update whose params are global arrays laid out over all 4
             devices on another mesh (a trainer's FSDP layout)
  diverge    process 1 is handed a different prompt: both must raise DivergenceError
  local      host-local engines: each process runs its own engine, tp=2 over its own devices
             (`make_mesh(2, devices=jax.local_devices())`), process 1 on a different workload
             (no step collectives, so no DivergenceError), weight updates arriving as global
             arrays of a trainer's FSDP layout over all 4 devices; `single` runs both
             workloads one after the other on 2 devices
  kill       process 1 dies mid-run: process 0 must end with JAX's error, not hang
  documented README's call exactly, with no mesh= (the engine builds the mesh over all processes'
             devices), for each (tp, dp) of DOCUMENTED in one pair of processes: tp=4 spanning
             the processes, dp=2 spanning them, tp2 x dp2 (dp across, tp within); `generate`,
             then `jengine.score` and `rl.token_logprobs` on the engine's mesh
"""

from __future__ import annotations

import json
import os
import sys
import time

COLUMN_BLOCKS = 2
HEARTBEAT_TIMEOUT_S = 5
ENGINE = dict(max_model_len=96, max_num_seqs=4, max_num_batched_tokens=32, page_size=8,
              num_pages=10, column_blocks=COLUMN_BLOCKS)  # fmt: skip
DOCUMENTED = [(4, 1), (1, 2), (2, 2)]  # (tp, dp) of the documented case
DOCUMENTED_ENGINE = dict(ENGINE, column_blocks=4)  # tp=4 needs 4 column blocks


def workload(vocab: int, other_prompt: bool = False):
    import numpy as np

    from jengine import SamplingParams

    rng = np.random.default_rng(5)
    shared = list(map(int, rng.integers(2, vocab, 24)))
    prompts = [shared + [7], shared + [9], list(map(int, rng.integers(2, vocab, 40))), [3, 4, 5],
               list(map(int, rng.integers(2, vocab, 17))), shared[:16] + [11, 12]]  # fmt: skip
    if other_prompt:
        prompts[2] = prompts[2][:-1] + [(prompts[2][-1] + 1) % vocab]
    params = [SamplingParams(temperature=0.9, top_p=0.9, max_tokens=10 + i % 4, seed=40 + i,
                             ignore_eos=True) for i in range(len(prompts))]  # fmt: skip
    return prompts, params


def perturbed(params, seed: int):
    import jax
    import numpy as np

    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda x: (np.asarray(x) + 0.01 * rng.standard_normal(x.shape)).astype(x.dtype), params
    )


def drive(engine, model, *, other_prompt=False, kill_at=None, new_params=None, place=None):
    """Adds the workload, steps with an abort, a keep update and a recompute update in the
    middle; returns ({request_id: output record}, engine stats). `place(params)` lays new params
    out (e.g. on a trainer's mesh) before they are handed to `update_weights`."""
    prompts, params = workload(model.config.vocab_size, other_prompt)
    place = place or (lambda p: p)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    done = {}
    step = 0
    while engine.has_unfinished_requests():
        if kill_at is not None and step == kill_at:
            os._exit(17)
        if step == 3:
            out = engine.abort(ids[4])
            done[out.request_id] = out
        if step == 5:
            engine.update_weights(place(new_params or perturbed(model.params, 1)), mode="keep")
        if step == 9:
            engine.update_weights(place(perturbed(model.params, 2)), mode="recompute")
        for out in engine.step():
            done[out.request_id] = out
        step += 1
    return {rid: record(done[rid]) for rid in ids}, {
        k: engine.stats[k] for k in ("preemptions", "prefix_cache_hit_tokens", "steps")
    }


def record(out) -> dict:
    """A `RequestOutput` as JSON: tokens, logprob bits, policy versions, finish reason."""
    import numpy as np

    return {"tokens": list(map(int, out.token_ids)),
            "bits": np.asarray(out.logprobs, np.float32).view(np.uint32).tolist(),
            "versions": out.policy_versions.tolist(), "finish": out.finish_reason}  # fmt: skip


def scored_bitwise(engine, prompts, params, outs) -> dict:
    """Whether `jengine.score` (on the params' mesh) and `rl.token_logprobs` on the engine's mesh
    reproduce the rollout's logprobs bit for bit: the trainer side on the same mesh."""
    import numpy as np

    import jengine
    from jengine import rl

    dp = engine.mesh.devices.shape[0]
    comps = [o.token_ids for o in outs]
    scored = jengine.score(engine.model, prompts, comps, params, numerics=engine.numerics)
    rows = len(prompts) + (-len(prompts)) % dp
    batch = rl.pack(prompts + prompts[: rows - len(prompts)], comps + comps[: rows - len(prompts)])
    lp = np.asarray(rl.token_logprobs(
        engine.model.params, engine.model.config, batch["tokens"], batch["prompt_lens"],
        batch["completion_lens"], sampling_params=params + params[: rows - len(prompts)],
        numerics=engine.numerics, mesh=engine.mesh,
    ))  # fmt: skip
    bits = lambda a: np.asarray(a, np.float32).view(np.uint32)  # noqa: E731
    return {
        "score_bitwise": all(
            np.array_equal(bits(s), bits(o.logprobs)) for s, o in zip(scored, outs)
        ),
        "token_logprobs_bitwise": all(
            np.array_equal(bits(lp[i, len(p) - 1 : len(p) - 1 + len(c)]), bits(o.logprobs))
            for i, (p, c, o) in enumerate(zip(prompts, comps, outs))
        ),
    }


def documented(model) -> dict:
    """README's multi-host call as written: `Engine(model, EngineConfig(tensor_parallel_size=T,
    data_parallel_size=D))`, no mesh=. Per layout: which process owns each mesh device, the
    outputs of `generate`, and the trainer side's bits on the engine's mesh; then a mesh without
    a device of this process, which the engine must refuse."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    from jengine import Engine, EngineConfig

    prompts, params = workload(model.config.vocab_size)
    report = {}
    for tp, dp in DOCUMENTED:
        engine = Engine(model, EngineConfig(tensor_parallel_size=tp, data_parallel_size=dp,
                                            **DOCUMENTED_ENGINE))  # fmt: skip
        outs = engine.generate(prompts, params, progress=False)
        report[f"{tp}x{dp}"] = {
            "processes": [[d.process_index for d in row] for row in engine.mesh.devices],
            "outputs": [record(o) for o in outs],
            **scored_bitwise(engine, prompts, params, outs),
        }
    others = [d for d in jax.devices() if d.process_index != jax.process_index()]
    try:
        Engine(model, EngineConfig(tensor_parallel_size=len(others), **DOCUMENTED_ENGINE),
               mesh=Mesh(np.asarray([others], dtype=object), ("data", "model")))  # fmt: skip
    except ValueError as e:
        report["foreign_mesh_error"] = str(e)
    return report


def _mesh(case: str, single: bool):
    import jax
    import numpy as np
    from jax.sharding import Mesh

    def d(p, i):  # device i of process p (of "process" p's half of the local devices)
        if single:
            return jax.devices()[2 * p + i]
        return [x for x in jax.devices() if x.process_index == p][i]

    grid = {
        "tp2": [[d(0, 0), d(1, 0)]],
        "dp2": [[d(0, 0)], [d(1, 0)]],
    }.get(case, [[d(0, 0), d(1, 0)], [d(0, 1), d(1, 1)]])
    return Mesh(np.asarray(grid, dtype=object), ("data", "model"))


def _trainer_layout(params):
    """Global arrays on a 1-D ('fsdp',) mesh over all devices: a layer leaf's axis 1 (its first
    axis after the stacked layers), another leaf's axis 0, split where it divides."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    devices = jax.devices()
    mesh = Mesh(np.asarray(devices, dtype=object), ("fsdp",))

    def put(x):
        x = np.asarray(x)
        axis = 1 if x.ndim == 3 else 0
        spec = P(*[None] * axis, "fsdp") if x.shape[axis] % len(devices) == 0 else P()
        return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda i: x[i])

    return jax.tree_util.tree_map(put, params)


def main(argv: list[str]) -> int:
    case, single = argv[1], argv[2] == "single"
    import jax

    if single:
        jax.config.update("jax_num_cpu_devices", 4)
        pid = 0
    else:
        pid = int(argv[2])
        jax.config.update("jax_num_cpu_devices", 2)
        jax.distributed.initialize(f"127.0.0.1:{argv[3]}", 2, pid,
                                   heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)  # fmt: skip
    from jengine import Engine, EngineConfig, Model, ModelConfig, init_params
    from jengine.engine import DivergenceError

    cfg = ModelConfig.named("tiny")
    model = Model(cfg, init_params(cfg, seed=0))
    report: dict = {"process": pid, "case": case, "devices": len(jax.devices())}
    t0 = time.perf_counter()
    if case == "documented":
        report["layouts"] = documented(model)
        report["seconds"] = round(time.perf_counter() - t0, 2)
        print(json.dumps(report), flush=True)
        return 0
    if case == "local":
        from jengine.sharding import make_mesh

        def local_run(other_prompt: bool):
            mesh = make_mesh(2, devices=jax.local_devices()[:2])
            engine = Engine(model, EngineConfig(tensor_parallel_size=2, **ENGINE), mesh=mesh)
            report["spans_processes"] = engine.spans_processes
            return drive(engine, model, other_prompt=other_prompt, place=_trainer_layout)[0]

        try:
            report["outputs"] = ([local_run(False), local_run(True)] if single
                                 else local_run(pid == 1))  # fmt: skip
        except DivergenceError as e:
            report["divergence"] = str(e)
        print(json.dumps(report), flush=True)
        return 0
    mesh = _mesh(case, single)
    dp, tp = mesh.devices.shape
    engine = Engine(model, EngineConfig(tensor_parallel_size=tp, data_parallel_size=dp, **ENGINE),
                    mesh=mesh)  # fmt: skip
    t0 = time.perf_counter()
    try:
        if case == "resharded":
            report["outputs"], report["stats"] = drive(engine, model, place=_trainer_layout)
        else:
            report["outputs"], report["stats"] = drive(
                engine, model, other_prompt=case == "diverge" and pid == 1,
                kill_at=6 if case == "kill" and pid == 1 else None,
            )  # fmt: skip
    except DivergenceError as e:
        report["divergence"] = str(e)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    if case == "tp2dp2":  # the trainer side on the same mesh: the rollout's bits
        fresh = Engine(model, EngineConfig(tensor_parallel_size=tp, data_parallel_size=dp,
                                           **ENGINE), mesh=mesh)  # fmt: skip
        prompts, params = workload(cfg.vocab_size)
        outs = fresh.generate(prompts, params, progress=False)
        report.update(scored_bitwise(fresh, prompts, params, outs))
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
