"""Multi-device sharding checks, run as a script with forced CPU devices (tests/test_sharding.py
runs it in a subprocess, because jax fixes its device count when first initialised).

    python -m tests.sharding_check [--devices 8] [--configs 2x1,4x1,...] [--scaling]

Prints one JSON object: per (tp, dp) whether tokens/logprobs are bitwise the single-device run's
and `jengine.score`'s, the per-device shard shapes, and timings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _set_devices(n: int) -> None:
    if "jax" in sys.modules:
        import jax

        if len(jax.devices()) < n:
            raise RuntimeError("jax was initialised before the device count could be forced")
        return
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"


CONFIGS = [(1, 1), (2, 1), (4, 1), (8, 1), (1, 2), (2, 2), (2, 4)]
COLUMN_BLOCKS = 8
ENGINE = {
    "max_model_len": 96,
    "max_num_seqs": 4,
    "max_num_batched_tokens": 16,
    "column_blocks": COLUMN_BLOCKS,
}


def _bits_equal(a, b) -> bool:
    import numpy as np

    return np.array_equal(np.asarray(a, np.float32).view(np.uint32),
                          np.asarray(b, np.float32).view(np.uint32))  # fmt: skip


def workload(vocab: int):
    import numpy as np

    from jengine import SamplingParams

    rng = np.random.default_rng(11)
    lengths = (5, 23, 40, 12, 9)
    prompts = [list(map(int, rng.integers(2, vocab, n))) for n in lengths]
    prompts[3] = prompts[1][:16] + prompts[3]  # a shared full page: prefix-cache hit
    params = [
        SamplingParams(temperature=1.0, max_tokens=6, seed=1),
        SamplingParams(temperature=0.7, top_k=40, max_tokens=5, seed=2),
        SamplingParams(temperature=0.0, max_tokens=4),
        SamplingParams(
            temperature=0.9, top_p=0.85, min_p=0.02, max_tokens=6
        ),  # engine-derived seed
        SamplingParams(temperature=1.1, max_tokens=3, seed=5),
    ]
    return prompts, params


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--configs", default=",".join(f"{t}x{d}" for t, d in CONFIGS))
    ap.add_argument("--score-meshes", default="8x1,2x2")
    ap.add_argument(
        "--family",
        default="tiny",
        choices=["tiny", "tiny-qwen"],
        help="tiny-qwen: qkv bias, qk-norm, untied lm_head, 4 KV heads (KV split at tp<=4)",
    )
    args = ap.parse_args(argv)
    _set_devices(args.devices)

    import jax
    import numpy as np

    import jengine
    from jengine import EngineConfig, Model, ModelConfig, Numerics, init_params, rl, sharding
    from jengine.engine import Engine

    report: dict = {"devices": len(jax.devices()), "configs": {}}
    cfg = ModelConfig.named("tiny")
    if args.family == "tiny-qwen":
        cfg = cfg.replace(
            qkv_bias=True, qk_norm=True, tie_word_embeddings=False, num_kv_heads=4, name="tiny-qwen"
        )
    model = Model(cfg, init_params(cfg, seed=0))
    report["family"] = args.family
    prompts, params = workload(cfg.vocab_size)

    def run(tp, dp, **extra):
        t0 = time.perf_counter()
        engine = Engine(
            model, EngineConfig(tensor_parallel_size=tp, data_parallel_size=dp, **ENGINE, **extra)
        )
        outs = engine.generate(prompts, params, progress=False)
        engine.check_invariants()
        return engine, outs, time.perf_counter() - t0

    # the reference: one device, same numerics (column_blocks), no mesh
    _, ref, seconds = run(1, 1)
    ref_tokens = [o.token_ids for o in ref]
    ref_lp = [o.logprobs for o in ref]
    report["reference"] = {"tokens": ref_tokens, "seconds": round(seconds, 1)}
    t0 = time.perf_counter()
    numerics = Numerics(column_blocks=COLUMN_BLOCKS)
    scored = jengine.score(model, prompts, ref_tokens, params, numerics=numerics)
    report["score_equals_reference"] = all(_bits_equal(a, b) for a, b in zip(scored, ref_lp))
    report["score_seconds"] = round(time.perf_counter() - t0, 1)

    def same(outs):
        return all(
            o.token_ids == t and _bits_equal(o.logprobs, lp)
            for o, t, lp in zip(outs, ref_tokens, ref_lp)
        )

    for item in args.configs.split(","):
        tp, dp = map(int, item.split("x"))
        engine, outs, seconds = run(tp, dp)
        row = {"bitwise_equal": same(outs), "seconds": round(seconds, 1)}
        if tp > 1:
            lay = engine.model.params["layers"]
            row["shards"] = {
                name: sorted({tuple(s.data.shape) for s in arr.addressable_shards})
                for name, arr in (
                    ("embed", engine.model.params["embed"]),
                    ("wq", lay["wq"]),
                    ("wk", lay["wk"]),
                    ("w_down", lay["w_down"]),
                    ("final_norm", engine.model.params["final_norm"]),
                    ("k_pages", engine.runner.kv[0]),
                )
            }
            row["shard_devices"] = len({s.device for s in lay["wq"].addressable_shards})
            row["kv_shape"] = list(engine.runner.kv[0].shape)  # [dp, layers, pages, page, kv, D]
        if dp > 1:
            row["replica_devices"] = [sorted(d.id for d in r) for r in engine.mesh.devices]
            k_pages = np.asarray(engine.runner.kv[0])
            row["replica_wrote_kv"] = [bool(np.any(k_pages[i] != 0)) for i in range(dp)]
        report["configs"][f"{tp}x{dp}"] = row
        engine.close()

    # trainer side: score sharded over a mesh (tp over 'model', sequences over 'data')
    for item in filter(None, args.score_meshes.split(",")):
        tp, dp = map(int, item.split("x"))
        t0 = time.perf_counter()
        mesh = sharding.make_mesh(tp, dp)
        s = jengine.score(model, prompts, ref_tokens, params, numerics=numerics, mesh=mesh)
        report[f"score_mesh_{tp}x{dp}_equals_reference"] = all(
            _bits_equal(a, b) for a, b in zip(s, ref_lp)
        )
        report[f"score_mesh_{tp}x{dp}_seconds"] = round(time.perf_counter() - t0, 1)
        # the differentiable trainer-side scorer on the same mesh (rows split over 'data')
        rows = len(prompts) + (-len(prompts)) % dp
        batch = rl.pack(prompts + prompts[: rows - len(prompts)],
                        ref_tokens + ref_tokens[: rows - len(prompts)])  # fmt: skip
        sp = params + params[: rows - len(prompts)]
        lp = rl.token_logprobs(model.params, cfg, batch["tokens"], batch["prompt_lens"],
                               batch["completion_lens"], sampling_params=sp, numerics=numerics,
                               mesh=mesh)  # fmt: skip
        lp = np.asarray(lp)
        report[f"rl_mesh_{tp}x{dp}_equals_reference"] = all(
            _bits_equal(lp[i, len(p) - 1 : len(p) - 1 + len(t)], ref_lp[i])
            for i, (p, t) in enumerate(zip(prompts, ref_tokens))
        )
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
