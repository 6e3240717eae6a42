"""One command that checks jengine on a lent accelerator and says how fast it is.

    python3 benchmarks/device_check.py --platform gpu --out DIR  # one H200: <= 8 minutes
    python benchmarks/device_check.py --platform cpu              # CI (a couple of minutes)

`--size` defaults to `tiny` on cpu and to `full` elsewhere; `--out` to a new temporary directory
(printed at the end). Writes DIR/device_check.json and DIR/summary.txt:
  * tests: the kernel tests and the invariance tests (batch, chunking, pages, prefix cache,
    preemption, rollout == score bitwise) run on the platform by pytest, counted pass/fail;
  * decode: the engine's decode step vs the HBM roofline (bytes of weights + live KV over
    4.8 TB/s, the H200's, and over the copy bandwidth measured here) at each batch, bf16 random
    weights of each model's real shape, invariant and fast numerics;
  * rollout: a GRPO-shaped workload (prompts x samples) through jengine vs transformers `generate`
    with the same weights on the same device;
  * compile: seconds per compiled bucket, from the engines' step traces.
Every section keeps to its share of the time budget (`--budget-s`) and records what it skipped.
Nothing is downloaded: weights are random, of real shapes. Exit status 1 when a test failed or a
section raised.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import types
import xml.etree.ElementTree as ET
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HBM_BYTES_PER_S = 4.8e12  # H200

SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        models=["tiny"],
        dtype="float32",
        batches=[1, 4],
        context=12,
        decode_steps=8,
        budget_s=240,
        max_num_batched_tokens=16,
        copy_mib=64,
        min_test_timeout_s=300,  # a slow shared CI machine
        rollout=dict(model="tiny", prompts=4, group=2, max_tokens=8, prompt_len=(8, 24)),
        tests={
            "kernels": ["tests/pallas_kernels/test_rms_norm.py", "-k", "cpu"],
            "invariance": [
                "tests/test_engine.py::test_rollout_logprobs_are_bitwise_score[tiny_model]"
            ],
        },
    ),
    "full": dict(
        models=["qwen3-0.6b", "llama-3.2-1b", "qwen2.5-0.5b"],
        dtype="bfloat16",
        batches=[1, 32, 256],
        context=256,
        decode_steps=8,
        budget_s=420,  # of the 8 minutes: the rest for start-up and a section's last step
        max_num_batched_tokens=256,  # few buckets: decode 16, 32, 256; prefill 256
        copy_mib=2048,
        min_test_timeout_s=60,
        rollout=dict(model="qwen3-0.6b", prompts=16, group=4, max_tokens=128, prompt_len=(64, 256)),
        tests={
            # on a device the kernel tests run the compiled kernels and the CPU lowering (the
            # interpret modes and the exports are CPU checks, which CI runs)
            "kernels": [
                "tests/pallas_kernels",
                "-k",
                "not tpu_interpret and not two_cores and not real_shapes",
            ],
            "invariance": [
                "tests/test_engine.py",
                "-k",
                "bitwise_score or logprobs_mode or independent or preemption or prefix_cache or siblings",
            ],
        },
    ),
}
# Shares of the budget, in order; a section may use what an earlier one left.
SHARES = {"tests": 0.4, "decode": 0.35, "rollout": 0.25}


def internals() -> types.SimpleNamespace:
    """Every call beyond jengine's public API, in one place: the step-trace reader (records with
    bucket_tokens, compiled, step_seconds, prefill_tokens, decode_tokens, as
    `EngineConfig(trace_path=...)` writes them) and the transformers twin of a jengine model
    (`benchmarks/bench.py`)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.bench import torch_model_from
    from jengine.diagnostics import read_trace

    return types.SimpleNamespace(read_trace=read_trace, torch_model_from=torch_model_from)


class Budget:
    """Wall-clock shares: `left(section)` is that section's remaining seconds."""

    def __init__(self, total_s: float):
        self.start, self.total = time.perf_counter(), total_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self, section: str) -> float:
        names = list(SHARES)
        until = sum(SHARES[n] for n in names[: names.index(section) + 1]) * self.total
        return until - self.elapsed()


# -- tests ------------------------------------------------------------------------------------


def run_tests(size: dict, platform: str, out_dir: str, budget: Budget) -> dict[str, Any]:
    """pytest on each selection in a subprocess on `platform`; counts from its junit XML (or, when
    it ran out of time, from its verbose log)."""
    results = {}
    groups = list(size["tests"].items())
    for i, (name, selection) in enumerate(groups):
        timeout = budget.left("tests") / (len(groups) - i)
        xml_path = os.path.join(out_dir, f"tests_{name}.xml")
        log_path = os.path.join(out_dir, f"tests_{name}.log")
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-v",
            "-p",
            "no:cacheprovider",
            f"--junitxml={xml_path}",
            *selection,
        ]
        env = {**os.environ, "JAX_PLATFORMS": platform, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
        start = time.perf_counter()
        with open(log_path, "w") as log:
            try:
                rc = subprocess.run(
                    cmd,
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=max(timeout, size["min_test_timeout_s"]),
                ).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        counts = (
            _junit_counts(xml_path)
            if rc != "timeout" and os.path.exists(xml_path)
            else _log_counts(log_path)
        )
        if rc not in (0, 1, "timeout"):  # collection error, no tests, interrupted: see the log
            counts["failed"] += 1
            counts["failures"].append(f"pytest exited with status {rc}")
        results[name] = {
            "selection": " ".join(selection),
            "returncode": rc,
            "seconds": round(time.perf_counter() - start, 1),
            **counts,
        }
    return results


def _junit_counts(path: str) -> dict[str, Any]:
    suites = ET.parse(path).getroot()
    failed, counts = [], {"passed": 0, "failed": 0, "skipped": 0}
    for case in suites.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
            failed.append(name)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failed}


def _log_counts(path: str) -> dict[str, Any]:
    lines = open(path).read().splitlines()
    pick = lambda word: [ln.split(" ")[0] for ln in lines if f" {word}" in ln and "::" in ln]  # noqa: E731
    failed = pick("FAILED") + pick("ERROR")
    return {
        "passed": len(pick("PASSED")),
        "failed": len(failed),
        "skipped": len(pick("SKIPPED")),
        "failures": failed,
        "note": "ran out of time: counts of the tests that finished",
    }


# -- decode vs roofline -----------------------------------------------------------------------


def copy_bandwidth(mib: int) -> float:
    """Best-of-10 bytes/s of an on-device elementwise copy (read + write counted)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((mib << 18,), jnp.float32)  # mib MiB
    double = jax.jit(lambda a: a * 2)
    double(x).block_until_ready()
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        double(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * x.nbytes / best


def random_model(name: str, dtype: str):
    from jengine import Model, ModelConfig, init_params

    config = ModelConfig.named(name).replace(dtype=dtype)
    return Model(config, init_params(config, seed=0, dtype=dtype))


def step_bytes(model, batch: int, context: int) -> tuple[int, int]:
    """(weight bytes, live KV bytes) one decode step must read: every weight once (the tied
    embedding is the lm_head; the lookup of `batch` rows is left out) and each sequence's keys
    and values for `context` positions."""
    import jax

    c = model.config
    weights = sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(model.params))
    item = model.params["embed"].dtype.itemsize
    kv = 2 * c.num_layers * c.num_kv_heads * c.head_dim * item * context * batch
    return weights, kv


def run_engine(model, prompts, params, trace_path: str, **config):
    """Runs the requests to completion, stepping by hand. Returns (outputs in submission order,
    wall seconds of each step that ran, that step's trace record, the engine's stats)."""
    from jengine import Engine, EngineConfig

    if os.path.exists(trace_path):  # the trace appends
        os.unlink(trace_path)
    engine = Engine(model, EngineConfig(trace_path=trace_path, **config))
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    done, walls = {}, []
    while engine.has_unfinished_requests():
        before = engine.stats["steps"]
        t = time.perf_counter()
        done.update((o.request_id, o) for o in engine.step())
        if engine.stats["steps"] > before:
            walls.append(time.perf_counter() - t)
    stats = engine.stats
    engine.close()
    records = internals().read_trace(trace_path)
    os.unlink(trace_path)
    assert len(records) == len(walls), (len(records), len(walls))
    return [done[i] for i in ids], walls, records, stats


def _sig(x: float | None) -> float | None:
    return None if x is None else float(f"{x:.4g}")


def log_compiles(log: list, model: str, numerics: str, records: list) -> None:
    """Appends each bucket's first compile (a later engine with the same shapes finds the jit
    cache warm, though its trace says it compiled)."""
    seen = {(c["model"], c["numerics"], c["bucket_tokens"], c["bucket_seqs"]) for c in log}
    for r in records:
        key = (model, numerics, r["bucket_tokens"], r["bucket_seqs"])
        if r["compiled"] and key not in seen:
            seen.add(key)
            log.append(
                dict(
                    zip(("model", "numerics", "bucket_tokens", "bucket_seqs"), key),
                    compile_s=round(r["compile_seconds"], 2),
                )
            )


def decode_rows(
    size: dict, out_dir: str, budget: Budget, bandwidth: float, compile_log: list
) -> dict:
    """One row per (model, numerics, batch); a (model, numerics) group starts only if the budget
    left exceeds what the previous group took (its first steps compile every bucket)."""
    rows, skipped, group_s = [], [], 0.0
    for name in size["models"]:
        model = None
        for numerics in ("invariant", "fast"):
            if budget.left("decode") <= group_s:
                skipped += [f"{name} {numerics} batch {b}" for b in size["batches"]]
                continue
            model = model or random_model(name, size["dtype"])
            start = time.perf_counter()
            for batch in size["batches"]:
                if budget.left("decode") <= 0:
                    skipped.append(f"{name} {numerics} batch {batch}")
                    continue
                row, records = decode_row(model, numerics, batch, size, out_dir, bandwidth)
                rows.append({"model": name, **row})
                log_compiles(compile_log, name, numerics, records)
            group_s = time.perf_counter() - start
    return {"rows": rows, "skipped": skipped}


def decode_row(model, numerics: str, batch: int, size: dict, out_dir: str, bandwidth: float):
    """`batch` requests of `context` random prompt tokens decoding `decode_steps` + 2 tokens; the
    step time is the median over steps that only decode and did not compile."""
    import numpy as np

    from jengine import SamplingParams

    ctx, steps, batches = size["context"], size["decode_steps"], size["batches"]
    rng = np.random.default_rng(batch)
    prompts = [rng.integers(3, model.config.vocab_size, ctx).tolist() for _ in range(batch)]
    params = [SamplingParams(max_tokens=steps + 2, ignore_eos=True, seed=i) for i in range(batch)]
    _, walls, records, stats = run_engine(
        model,
        prompts,
        params,
        os.path.join(out_dir, f"trace_decode_{numerics}_{batch}.jsonl"),
        numerics=numerics,
        max_num_seqs=max(batches),
        max_num_batched_tokens=max(size["max_num_batched_tokens"], max(batches)),
        max_model_len=ctx + steps + 8,
    )
    decode = [
        (wall, r["step_seconds"])
        for wall, r in zip(walls, records)
        if r["prefill_tokens"] == 0 and r["decode_tokens"] == batch and not r["compiled"]
    ]
    weights, kv = step_bytes(model, batch, ctx + steps // 2)
    step_ms = 1000 * float(np.median([d[1] for d in decode])) if decode else None
    wall_ms = 1000 * float(np.median([d[0] for d in decode])) if decode else None
    floor_ms = 1000 * (weights + kv) / HBM_BYTES_PER_S
    row = {
        "dtype": size["dtype"],
        "numerics": numerics,
        "batch": batch,
        "context": ctx,
        "weights_MB": round(weights / 1e6, 1),
        "kv_MB": round(kv / 1e6, 1),
        "roofline_ms": _sig(floor_ms),
        "roofline_measured_bw_ms": _sig(1000 * (weights + kv) / bandwidth),
        "step_ms": _sig(step_ms),
        "engine_step_ms": _sig(wall_ms),
        "fraction_of_roofline": _sig(floor_ms / step_ms if step_ms else None),
        "tok_s": _sig(batch / step_ms * 1000 if step_ms else None),
        "decode_steps_timed": len(decode),
        "num_pages": stats["num_pages"],
    }
    return row, records


# -- rollout vs transformers ------------------------------------------------------------------


def workload(vocab: int, prompts: int, group: int, max_tokens: int, prompt_len, seed: int):
    import numpy as np

    from jengine import SamplingParams

    rng = np.random.default_rng(seed)
    toks, params = [], []
    for _ in range(prompts):
        prompt = rng.integers(
            3, vocab, int(rng.integers(prompt_len[0], prompt_len[1] + 1))
        ).tolist()
        for _ in range(group):  # a GRPO group shares its prompt
            toks.append(prompt)
            params.append(
                SamplingParams(
                    temperature=1.0, max_tokens=max_tokens, seed=seed * 1000 + len(params)
                )
            )
    return toks, params


def rollout(size: dict, device: str, out_dir: str, budget: Budget, compile_log: list) -> dict:
    """The warm-up run (same shape, other prompts) compiles; the second run is timed."""
    r = size["rollout"]
    model = random_model(r["model"], size["dtype"])
    vocab = model.config.vocab_size
    shape = (r["prompts"], r["group"], r["max_tokens"], r["prompt_len"])
    warm, timed = workload(vocab, *shape, seed=1), workload(vocab, *shape, seed=2)
    config = dict(
        max_num_seqs=len(timed[0]),
        max_num_batched_tokens=size["max_num_batched_tokens"],
        max_model_len=r["prompt_len"][1] + r["max_tokens"] + 8,
    )
    rows, skipped, outs, last_s = [], [], None, 0.0
    for numerics in ("invariant", "fast"):
        if budget.left("rollout") <= last_s:  # another engine costs about what the last did
            skipped.append(f"jengine {numerics}")
            continue
        start = time.perf_counter()
        trace = os.path.join(out_dir, f"trace_rollout_{numerics}.jsonl")
        _, _, recs, _ = run_engine(model, *warm, trace, numerics=numerics, **config)  # compiles
        log_compiles(compile_log, r["model"], numerics, recs)
        t = time.perf_counter()
        got, _, recs, _ = run_engine(model, *timed, trace, numerics=numerics, **config)
        seconds = time.perf_counter() - t
        tokens = sum(len(o.token_ids) for o in got)
        rows.append(
            {
                "engine": f"jengine {numerics}",
                "seqs": len(got),
                "tokens": tokens,
                "seconds": round(seconds, 3),
                "tok_s": round(tokens / seconds, 1),
                "compiles_in_timed_run": sum(x["compiled"] for x in recs),
            }
        )
        outs, last_s = outs or got, time.perf_counter() - start
    if budget.left("rollout") <= 0:
        skipped.append("transformers generate")
        return {"rows": rows, "skipped": skipped}
    hf, parity = transformers_generate(model, timed, device, outs)
    rows.append(hf)
    return {
        "rows": rows,
        "skipped": skipped,
        "hf_logprob_max_abs_diff": parity,
        "speedup_vs_transformers": {
            x["engine"]: round(x["tok_s"] / hf["tok_s"], 2) for x in rows[:-1]
        },
    }


def transformers_generate(model, work, device: str, outs) -> tuple[dict, float | None]:
    """transformers `generate` on the same weights (bf16 on CUDA), one left-padded batch, sampled
    at temperature 1 with no filters; and the largest |logprob| difference between jengine's
    first completion and the torch model teacher-forced on it (a same-weights check)."""
    import numpy as np
    import torch

    prompts, params = work
    dtype = torch.bfloat16 if model.config.dtype == "bfloat16" else torch.float32
    tm = internals().torch_model_from(model).to(device=device, dtype=dtype)
    eos = list(model.config.eos_token_ids) or [0]
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), eos[0], dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    ids, mask = ids.to(device), mask.to(device)
    kw = dict(
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=eos, pad_token_id=eos[0]
    )
    with torch.no_grad():
        tm.generate(input_ids=ids[:2], attention_mask=mask[:2], max_new_tokens=2, **kw)  # warm
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        gen = tm.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=params[0].max_tokens, **kw
        )
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        gen = gen[:, width:].cpu().numpy()
        tokens = sum(
            next((j + 1 for j, x in enumerate(row) if x in eos), len(row)) for row in gen.tolist()
        )
        parity = None
        if outs:
            seq = torch.tensor([prompts[0] + outs[0].token_ids], device=device)
            logits = tm(seq).logits[0, len(prompts[0]) - 1 : -1].float()
            theirs = torch.log_softmax(logits, -1).gather(1, seq[0, len(prompts[0]) :, None])[:, 0]
            parity = float(np.max(np.abs(theirs.cpu().numpy() - outs[0].logprobs)))
    row = {
        "engine": "transformers generate",
        "seqs": len(prompts),
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tok_s": round(tokens / seconds, 1),
        "dtype": str(dtype),
    }
    return row, parity


# -- driver -----------------------------------------------------------------------------------


def summary(result: dict) -> str:
    lines = [
        f"jengine device check: {result.get('environment', {}).get('devices')} "
        f"({result['size']}), {result['seconds']} s of {result['budget_s']} s budget"
    ]
    for name, t in result.get("tests", {}).items():
        lines.append(
            f"tests {name}: {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped"
            + (f" ({t['note']})" if t.get("note") else "")
        )
        lines += [f"  FAILED {f}" for f in t["failures"][:20]]
    decode = result.get("decode", {})
    if decode.get("rows"):
        lines.append(
            f"decode (bandwidth measured {result.get('copy_bandwidth_GBs')} GB/s; roofline at "
            f"{HBM_BYTES_PER_S / 1e12} TB/s):"
        )
        for r in decode["rows"]:
            lines.append(
                f"  {r['model']:14s} {r['numerics']:9s} batch {r['batch']:4d}: step {r['step_ms']} ms"
                f" (engine.step {r['engine_step_ms']} ms), roofline {r['roofline_ms']} ms"
                f" / {r['roofline_measured_bw_ms']} ms, {r['fraction_of_roofline']} of roofline"
            )
    for r in result.get("rollout", {}).get("rows", []):
        lines.append(
            f"rollout {r['engine']}: {r['tokens']} tokens in {r['seconds']} s = {r['tok_s']} tok/s"
        )
    if "speedup_vs_transformers" in result.get("rollout", {}):
        lines.append(
            f"  vs transformers: {result['rollout']['speedup_vs_transformers']}, same-weights "
            f"logprob max diff {result['rollout']['hf_logprob_max_abs_diff']}"
        )
    for c in result.get("compile", []):
        bucket = f"{c['bucket_tokens']}x{c['bucket_seqs']}"
        lines.append(f"compile {c['model']} {c['numerics']} bucket {bucket}: {c['compile_s']} s")
    for section in ("decode", "rollout"):
        if result.get(section, {}).get("skipped"):
            lines.append(
                f"{section} skipped (time budget): {', '.join(result[section]['skipped'])}"
            )
    lines += [f"ERROR in {k}: {v.splitlines()[-1]}" for k, v in result.get("errors", {}).items()]
    return "\n".join(lines) + "\n"


def environment() -> dict[str, Any]:
    import jax

    def version(module: str) -> str | None:
        try:
            return __import__(module).__version__
        except ImportError:
            return None

    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [d.device_kind for d in jax.devices()],
        "python": sys.version.split()[0],
        **{m: version(m) for m in ("jaxlib", "torch", "transformers", "numpy")},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--platform", choices=["gpu", "cuda", "cpu", "tpu"], default="gpu")
    ap.add_argument(
        "--size", choices=sorted(SIZES), help="default: tiny on cpu, full on an accelerator"
    )
    ap.add_argument(
        "--out",
        help="directory for device_check.json and summary.txt (default: a new temporary one)",
    )
    ap.add_argument(
        "--budget-s", type=float, default=None, help="wall-clock budget (default by size)"
    )
    ap.add_argument("--sections", default="tests,decode,rollout")
    ap.add_argument(
        "--models", help="comma-separated configs for the decode table (default by size)"
    )
    ap.add_argument("--batches", help="comma-separated decode batch sizes (default by size)")
    args = ap.parse_args(argv)
    platform = {"gpu": "cuda"}.get(args.platform, args.platform)
    os.environ["JAX_PLATFORMS"] = platform
    if platform == "cuda":  # leave room on the device for the transformers baseline
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")
    sys.path.insert(0, ROOT)
    args.size = args.size or ("tiny" if platform == "cpu" else "full")
    args.out = args.out or tempfile.mkdtemp(prefix="device_check_")
    os.makedirs(args.out, exist_ok=True)
    size = dict(SIZES[args.size])
    if args.models:
        size["models"] = args.models.split(",")
    if args.batches:
        size["batches"] = [int(b) for b in args.batches.split(",")]
    budget = Budget(args.budget_s or size["budget_s"])
    sections = args.sections.split(",")

    result: dict[str, Any] = {
        "size": args.size,
        "platform": platform,
        "budget_s": budget.total,
        "errors": {},
    }
    compile_log: list = []
    device = "cuda" if platform == "cuda" else "cpu"

    def attempt(name, fn):
        try:
            result[name] = fn()
        except Exception:  # one section's failure must not lose the others' figures
            result["errors"][name] = traceback.format_exc()
        result["compile"], result["seconds"] = compile_log, round(budget.elapsed(), 1)
        with open(os.path.join(args.out, "device_check.json"), "w") as f:  # after every section:
            json.dump(result, f, indent=1)  # a run killed at its time limit keeps what it had
        with open(os.path.join(args.out, "summary.txt"), "w") as f:
            f.write(summary(result))

    if "tests" in sections:  # first: the pytest processes get the device to themselves
        attempt("tests", lambda: run_tests(size, platform, args.out, budget))
    attempt("environment", environment)
    if "decode" in sections:
        attempt("copy_bandwidth_GBs", lambda: round(copy_bandwidth(size["copy_mib"]) / 1e9, 1))
        bw = result.get("copy_bandwidth_GBs", HBM_BYTES_PER_S / 1e9) * 1e9
        attempt("decode", lambda: decode_rows(size, args.out, budget, bw, compile_log))
    if "rollout" in sections:
        attempt("rollout", lambda: rollout(size, device, args.out, budget, compile_log))
    print(summary(result), end="")
    print(f"wrote {os.path.join(args.out, 'device_check.json')} and summary.txt")
    failed = sum(t.get("failed", 0) for t in result.get("tests", {}).values())
    return 1 if failed or result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
