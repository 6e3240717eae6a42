"""End-to-end RL rollout throughput: jengine (invariant, fast) vs transformers `generate`.

    python benchmarks/rollout.py                                  # SmolLM2-135M, 8 prompts x 4 samples x 64 tokens
    python benchmarks/rollout.py --model qwen2.5-0.5b --prompts 4  # random weights of that shape
    python benchmarks/rollout.py --model gemma3-270m              # real weights; baseline: transformers reading the GGUF

Workload: N prompts of mixed lengths, G samples per prompt (a GRPO group shares its prompt),
temperature 1.0, EOS ends a sample. Three timed workloads per engine: 'uniform' (every sample may run
to --max-tokens; the figure comparable to transformers' batched generate) and 'mixed' (each
sample's max_tokens uniform in [max/4, max]) and 'straggler' (seven samples in eight stop by max/8,
the rest may run to max: a rollout's tail). Each jengine engine first runs an untimed workload of
the same shape with other prompts, so the timed runs measure warm (compiled) throughput.
Writes JSON to --out (default benchmarks/results/rollout_<model>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 or gemma3-270m (real GGUF weights if installed) or a shipped config name")
    ap.add_argument("--random", action="store_true", help="random weights even for smollm2")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=256)
    ap.add_argument("--budget", type=int, default=512, help="max_num_batched_tokens")
    ap.add_argument("--min-token-bucket", type=int, default=16, help="EngineConfig.min_token_bucket")
    ap.add_argument("--engines", default="invariant,fast,hf")
    ap.add_argument("--workloads", default="uniform,mixed,straggler",
                    help="comma-separated, from " + ",".join(bench.WORKLOAD_LENGTHS))
    ap.add_argument("--wait-quiet", type=float, default=0.0)
    ap.add_argument("--no-parity", action="store_true", help="skip the torch-vs-jengine weight check")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    out_path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                        f"rollout_{args.model}.json")
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    gguf_path = None  # set for a real model transformers reads from its GGUF file
    if args.model == "smollm2":
        model, desc = bench.smollm2(args.dtype, prefer_real=not args.random)
    elif args.model == "gemma3-270m" and not args.random:
        model, desc, gguf_path = bench.gemma3_270m(args.dtype)
    else:
        model, desc = bench.random_model(args.model, args.dtype), f"{args.model} shape, random weights ({args.dtype})"
    print("model:", desc, flush=True)
    tok = bench._tokenizer_for(model)
    vocab = model.config.vocab_size
    mk = lambda seed, lengths: bench.rl_workload(
        vocab, num_prompts=args.prompts, group=args.group, max_tokens=args.max_tokens,
        lengths=lengths, seed=seed, tokenizer=tok)
    warm = mk(1, "uniform")
    seeds = {"uniform": 0, "mixed": 2, "straggler": 3}
    names = args.workloads.split(",")
    if unknown := [n for n in names if n not in seeds]:
        ap.error(f"--workloads: unknown {unknown}; choose from {sorted(seeds)}")
    workloads = {name: mk(seeds[name], name) for name in names}
    results = {"machine": bench.machine(), "model": desc, "args": vars(args),
               "workloads": {k: v.name for k, v in workloads.items()}, "rows": []}

    def save():
        with open(out_path, "w") as f:
            json.dump(results, f, indent=2, default=str)

    engines = args.engines.split(",")
    if "hf" in engines:
        t = time.perf_counter()
        tm = bench.transformers_gguf_model(gguf_path) if gguf_path else bench.torch_model_from(model)
        results["hf_build_s"] = round(time.perf_counter() - t, 2)
        try:
            if args.no_parity:
                raise RuntimeError("skipped (--no-parity)")
            results["hf_parity_max_abs_logprob_diff"] = bench.hf_parity(model, tm, warm.prompts[0][:48])
        except Exception as e:  # parity is a sanity check, not the benchmark
            results["hf_parity_error"] = repr(e)
        print("hf parity:", results.get("hf_parity_max_abs_logprob_diff"), flush=True)
        small = bench.Workload("warm", warm.prompts[:2], [p.__class__(temperature=1.0, max_tokens=4) for p in warm.params[:2]], 1)
        bench.run_hf(tm, small, model.config.eos_token_ids)
        for name, wl in workloads.items():
            if args.wait_quiet:
                bench.wait_for_quiet(1.5, args.wait_quiet)
            r = bench.run_hf(tm, wl, model.config.eos_token_ids)
            r["workload"] = name
            print(json.dumps(r), flush=True)
            results["rows"].append(r)
            save()
        del tm
    for mode in ("invariant", "fast"):
        if mode not in engines:
            continue
        engine = None
        for i, (name, wl) in enumerate(workloads.items()):
            if args.wait_quiet:
                bench.wait_for_quiet(1.5, args.wait_quiet)
            r, engine = bench.run_jengine(model, wl, numerics=mode, warm=warm if i == 0 else None, engine=engine,
                                          max_num_seqs=wl.num_seqs, max_num_batched_tokens=args.budget,
                                          max_model_len=args.max_model_len,
                                          min_token_bucket=args.min_token_bucket)
            r["workload"] = name
            r["compile_s_total"] = round(engine.runner.compile_seconds, 2)
            r["compilations_total"] = len(engine.runner.compiled)
            print(json.dumps(r), flush=True)
            results["rows"].append(r)
            save()
        del engine
    by = {(r["workload"], r["engine"]): r for r in results["rows"]}
    for name in workloads:
        hf = by.get((name, "transformers generate"))
        inv = by.get((name, "jengine invariant"))
        fast = by.get((name, "jengine fast"))
        for r in (inv, fast):
            if r and hf:
                r["vs_transformers"] = round(r["tok_s"] / hf["tok_s"], 2)
                r["vs_transformers_excl_compile"] = round(r["tok_s_excl_compile"] / hf["tok_s"], 2)
                r["vs_transformers_cpu_time"] = round(r["tok_per_cpu_s"] / hf["tok_per_cpu_s"], 2)
        if inv and fast:
            inv["invariant_over_fast_time"] = round(inv["seconds"] / fast["seconds"], 3)
            inv["invariant_over_fast_cpu_time"] = round(inv["cpu_s"] / fast["cpu_s"], 3)
            inv["invariant_over_fast_time_excl_compile"] = round(
                (inv["seconds"] - inv["compile_s_in_timed_run"]) / (fast["seconds"] - fast["compile_s_in_timed_run"]), 3)
    save()
    cols = ["workload", "engine", "seqs", "tokens", "seconds", "tok_s", "tok_s_excl_compile", "req_s",
            "vs_transformers", "cpu_s", "tok_per_cpu_s", "load_before", "load_after"]
    print(bench.table(f"Rollout throughput ({desc})", results["rows"], cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
