"""Golden outputs: a fixed set of rollouts and trainer-side logprobs, kept bit for bit.

    python -m tests.golden record [PATH]   # writes tests/data/golden.json (or PATH)
    python -m tests.golden check  [PATH]   # prints a JSON report; exit status 1 on any difference
    python -m tests.golden check --cases=tp1,rl_token_logprobs   # only these cases

`tests/test_golden.py` runs `check` in a subprocess with 4 forced CPU devices (the tp / dp cases
need them) and XLA's CPU code generation capped at AVX2 (`ISA_FLAGS`), so the bits do not depend on
which x86 vector extensions the machine running the tests happens to have.

The cases cover what a refactor must not change: several sampling settings and logprobs modes,
prefix caching, chunked prefill and preemption (asserted to happen), bf16 and fast numerics, a
keep and a recompute weight update in the middle of a run, tp=2, dp=2 and tp=2 x dp=2 with the
same column blocks, and `rl.token_logprobs` (with entropy) on a packed batch. Logprobs are stored
as the hex of their float32 bits, so -0.0 and +0.0 (and NaN payloads) count as different.
"""

from __future__ import annotations

import json
import os
import sys

DEVICES = 4
ISA_FLAGS = "--xla_cpu_max_isa=AVX2"
DEFAULT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "golden.json")


def _setup() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    want = f"--xla_force_host_platform_device_count={DEVICES} {ISA_FLAGS}"
    if "jax" in sys.modules:
        raise RuntimeError("import tests.golden before jax: it must set XLA_FLAGS first")
    os.environ["XLA_FLAGS"] = f"{flags} {want}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"


def _bits(values) -> str:
    import numpy as np

    return np.asarray(values, np.float32).view(np.uint32).tobytes().hex()


def _record_outputs(outs) -> list[dict]:
    return [
        {
            "request_id": o.request_id,
            "token_ids": list(map(int, o.token_ids)),
            "logprobs": _bits(o.logprobs),
            "policy_versions": [int(v) for v in o.policy_versions],
            "finish_reason": o.finish_reason,
            "top_logprobs": None
            if o.top_logprobs is None
            else [[[int(t), _bits([v])] for t, v in row] for row in o.top_logprobs],
        }
        for o in outs
    ]


def _workload(vocab: int):
    """12 requests: a GRPO group of 4 sharing a 40-token prompt, 8 others of mixed lengths."""
    import numpy as np

    from jengine import SamplingParams

    rng = np.random.default_rng(2024)
    shared = list(map(int, rng.integers(2, vocab, 40)))
    prompts = [shared] * 4 + [
        list(map(int, rng.integers(2, vocab, int(n)))) for n in (3, 17, 33, 70, 9, 52, 130, 24)
    ]
    kinds = [
        dict(temperature=1.0),
        dict(temperature=0.7, top_k=40),
        dict(temperature=0.9, top_p=0.85),
        dict(temperature=1.1, min_p=0.05),
        dict(temperature=0.6, top_k=30, top_p=0.9, min_p=0.02),
        dict(temperature=0.0),
        dict(temperature=0.8, top_k=5, logprobs=3),
        dict(temperature=1.0, stop_token_ids=(7, 11, 13, 17, 19, 23, 29, 31)),
    ]
    params = [
        SamplingParams(**kinds[i % len(kinds)], max_tokens=6 + (i * 5) % 13, seed=1000 + i)
        for i in range(len(prompts))
    ]
    return prompts, params


ENGINE = dict(
    max_model_len=256,
    max_num_seqs=6,
    max_num_batched_tokens=32,
    page_size=8,
    num_pages=24,
)


def _run(model, prompts, params, **cfg):
    from jengine import Engine, EngineConfig

    engine = Engine(model, EngineConfig(**{**ENGINE, **cfg}))
    outs = engine.generate(prompts, params, progress=False)
    stats = {k: engine.stats[k] for k in ("preemptions", "prefix_cache_hit_tokens", "steps")}
    engine.close()
    return {"outputs": _record_outputs(outs), "stats": stats}


def _perturbed(params, seed: int):
    """params + 0.01 N(0, 1), drawn leaf by leaf in the order of the per-layer tree."""
    import jax
    import numpy as np

    from jengine.models.transformer import stack_layers, unstack_layers

    rng = np.random.default_rng(seed)
    return stack_layers(jax.tree_util.tree_map(
        lambda x: (np.asarray(x) + 0.01 * rng.standard_normal(x.shape)).astype(x.dtype),
        unstack_layers(params)))  # fmt: skip


def _run_with_update(model, prompts, params, mode: str):
    """Steps the workload, swaps in perturbed weights after 6 steps, runs to the end."""
    from jengine import Engine, EngineConfig

    engine = Engine(model, EngineConfig(**ENGINE))
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    done = {}
    for _ in range(6):
        done.update({o.request_id: o for o in engine.step()})
    engine.update_weights(_perturbed(model.params, 7), mode=mode)
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step()})
    stats = {k: engine.stats[k] for k in ("preemptions", "prefix_cache_hit_tokens", "steps")}
    engine.close()
    return {"outputs": _record_outputs([done[i] for i in ids]), "stats": stats}


def _token_logprobs(model, prompts, params, outputs):
    import numpy as np

    from jengine import rl

    completions = [o["token_ids"] for o in outputs]
    batch = rl.pack(prompts, completions)
    values, entropy = rl.token_logprobs(
        model.params,
        model.config,
        batch["tokens"],
        batch["prompt_lens"],
        batch["completion_lens"],
        sampling_params=params,
        with_entropy=True,
    )
    return {"values": _bits(np.asarray(values)), "entropy": _bits(np.asarray(entropy))}


def compute(only: tuple[str, ...] | None = None) -> dict:
    """Runs every case, or the cases named in `only` (rl_token_logprobs scores tp1's outputs)."""
    import jax

    from jengine import Model, ModelConfig, init_params

    assert len(jax.devices()) >= DEVICES, jax.devices()
    cfg = ModelConfig.named("tiny")
    model = Model(cfg, init_params(cfg, seed=0))
    bf16 = Model(cfg.replace(dtype="bfloat16"), init_params(cfg, seed=0, dtype="bfloat16"))
    prompts, params = _workload(cfg.vocab_size)
    thunks = {
        "tp1": lambda: _run(model, prompts, params),
        "tp1_no_prefix_cache": lambda: _run(model, prompts, params, enable_prefix_caching=False),
        "tp1_raw_logprobs": lambda: _run(model, prompts[:6], params[:6],
                                         logprobs_mode="raw_logprobs"),
        "tp1_bf16": lambda: _run(bf16, prompts[:6], params[:6]),
        "tp1_bf16_head": lambda: _run(model, prompts[:6], params[:6], lm_head_dtype="bfloat16"),
        "tp1_fast": lambda: _run(model, prompts, params, numerics="fast"),
        "update_keep": lambda: _run_with_update(model, prompts, params, "keep"),
        "update_recompute": lambda: _run_with_update(model, prompts, params, "recompute"),
        "tp1_cb2": lambda: _run(model, prompts, params, column_blocks=2),
        "tp2": lambda: _run(model, prompts, params, tensor_parallel_size=2),
        "dp2": lambda: _run(model, prompts, params, data_parallel_size=2),
        "tp2_dp2": lambda: _run(model, prompts, params, tensor_parallel_size=2,
                                data_parallel_size=2),
    }  # fmt: skip
    wanted = set(thunks) | {"rl_token_logprobs"} if only is None else set(only)
    cases = {name: run() for name, run in thunks.items()
             if name in wanted or (name == "tp1" and "rl_token_logprobs" in wanted)}  # fmt: skip
    if "rl_token_logprobs" in wanted:
        cases["rl_token_logprobs"] = _token_logprobs(model, prompts, params,
                                                     cases["tp1"]["outputs"])  # fmt: skip
    return {"jax": jax.__version__, "xla_flags": ISA_FLAGS,
            "cases": {k: v for k, v in cases.items() if k in wanted}}  # fmt: skip


def _diff(want, got, where: str = "") -> str | None:
    """The first place two JSON values differ, or None."""
    if type(want) is not type(got):
        return f"{where}: {type(want).__name__} vs {type(got).__name__}"
    if isinstance(want, dict):
        for k in sorted(set(want) | set(got)):
            if k not in want or k not in got:
                return f"{where}.{k}: missing on one side"
            d = _diff(want[k], got[k], f"{where}.{k}")
            if d:
                return d
        return None
    if isinstance(want, list):
        if len(want) != len(got):
            return f"{where}: length {len(want)} vs {len(got)}"
        for i, (a, b) in enumerate(zip(want, got)):
            d = _diff(a, b, f"{where}[{i}]")
            if d:
                return d
        return None
    if want == got:
        return None
    if isinstance(want, str) and len(want) == len(got) and len(want) % 8 == 0:  # float32 bits
        i = next(i for i in range(0, len(want), 8) if want[i : i + 8] != got[i : i + 8])
        return f"{where}: value {i // 8} has bits {want[i : i + 8]} vs {got[i : i + 8]}"
    return f"{where}: {str(want)[:80]} vs {str(got)[:80]}"


def main(argv: list[str]) -> int:
    only = next((a.split("=", 1)[1].split(",") for a in argv if a.startswith("--cases=")), None)
    argv = [a for a in argv if not a.startswith("--cases=")]
    command = argv[1] if len(argv) > 1 else "check"
    path = argv[2] if len(argv) > 2 else DEFAULT_PATH
    if command == "record" and only is not None:
        raise SystemExit("record writes every case: drop --cases")
    _setup()
    got = compute(None if only is None else tuple(only))
    if command == "record":
        tp1 = got["cases"]["tp1"]["stats"]
        assert tp1["preemptions"] > 0 and tp1["prefix_cache_hit_tokens"] > 0, tp1
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(got, f, indent=1, sort_keys=True)
            f.write("\n")
        print(json.dumps({"recorded": path, "cases": sorted(got["cases"])}))
        return 0
    with open(path) as f:
        want = json.load(f)
    report = {
        name: _diff(case, got["cases"].get(name), name)
        for name, case in want["cases"].items()
        if only is None or name in only
    }
    print(json.dumps({"differences": {k: v for k, v in report.items() if v}, "cases": len(report)}))
    return 1 if any(report.values()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
