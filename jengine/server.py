"""`python -m jengine serve`: an OpenAI-compatible HTTP server over one `Engine`.

    python -m jengine serve --model=smollm2 --port=8000
    curl localhost:8000/v1/completions -d '{"prompt": "Hello", "max_tokens": 8, "seed": 0}'

One background thread owns the engine (`EngineLoop`): it runs the calls the HTTP handlers hand it
(add requests, abort, update weights, pause) between two engine steps, steps while anything is
in flight, and after every step hands each request's new tokens to the event loop that waits
for them. Handlers never touch the engine. A request's tokens and logprobs are therefore exactly
`Engine.generate`'s for the same prompt and sampling params (seed included), whatever else is
being served.

Endpoints: POST /v1/completions, POST /v1/chat/completions (OpenAI's request and response
shapes, `stream` as server-sent events), GET /v1/models, GET /health, GET /metrics (Prometheus
text), and the admin endpoints POST /update_weights, /pause, /resume (refused unless an admin key
is configured). jengine's extras are opt-in per request: `return_token_ids` (`prompt_token_ids`,
`token_ids`), `return_token_logprobs` (`token_logprobs`, float32 values that round-trip bit for
bit; `logprobs_encoding="base64"`: little-endian float32 bytes), `return_policy_versions`.

Only this module's functions import starlette and uvicorn (the `serve` extra): `ServerConfig` is
importable without them, so the CLI builds its flags from it.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import dataclasses
import functools
import hmac
import json
import logging
import math
import os
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jengine.config import SamplingParams, _field, _validate

log = logging.getLogger("jengine.server")

ADMIN_PATHS = ("/update_weights", "/pause", "/resume")
OPEN_PATHS = ("/health",)  # answered without a key
MAX_N = 128  # most choices per prompt (OpenAI's bound)
FINISH_REASONS = {"stop": "stop", "length": "length", "aborted": "abort", "error": "error"}
MIN_LOGPROB = -9999.0  # OpenAI fields cannot hold -inf; vLLM clamps the same way


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """The HTTP side of `jengine serve` (the engine's knobs are `EngineConfig`'s)."""

    host: str = _field("127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
    port: int = _field(8000, "TCP port to listen on.", lo=0, hi=65535)
    api_key: str | None = _field(
        None, "Bearer key every endpoint but /health requires (default: $JENGINE_API_KEY; unset: "
        "open).")  # fmt: skip
    admin_key: str | None = _field(
        None, "Bearer key of /update_weights, /pause, /resume (default: $JENGINE_ADMIN_KEY; "
        "unset: those endpoints are refused).")  # fmt: skip
    weights_dir: str | None = _field(
        None, "/update_weights loads only checkpoint dirs inside this directory.", path=True)
    served_model_name: str | None = _field(
        None, "Model name clients send and /v1/models lists (default: --model).")
    shutdown_timeout: float = _field(
        30.0, "On SIGTERM, seconds in-flight requests may run before they are aborted.", lo=0.0)
    warmup: bool = _field(True, "Compile every step bucket before listening.")

    def __post_init__(self) -> None:
        _validate(self)


class ApiError(Exception):
    """A request the server refuses: the HTTP status and an OpenAI-shaped error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                503: "service_unavailable"}.get(self.status, "invalid_request_error")  # fmt: skip
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.code}}  # fmt: skip


# -- the engine thread -----------------------------------------------------------------------------


Sink = tuple[asyncio.AbstractEventLoop, asyncio.Queue]  # where a group's outputs are put


@dataclasses.dataclass
class _Live:
    """A request in the engine: where its outputs go (`sink`, with `key`) and how many tokens of
    it were handed over."""

    sink: Sink
    key: Any
    sent: int = 0


def _put_all(batch: list[tuple[asyncio.Queue, list]]) -> None:
    for q, items in batch:
        q.put_nowait(items)


class EngineLoop:
    """One thread that owns `engine` and serves the event loop's requests.

    `call(fn)` runs `fn(engine)` on the thread between two steps and returns a
    `concurrent.futures.Future` of its result. `submit` adds a group of requests, all or none;
    after every step each request's new tokens go to its sink (event loop, asyncio queue) as a
    list of `(key, RequestOutput)` pairs (the output holds only the tokens not handed over yet;
    finish_reason None while it runs): one list per sink and step, one wake-up per event loop
    and step. `close()` aborts what is in flight (every waiting consumer gets its request's
    'aborted' output) and joins the thread.
    """

    def __init__(self, engine: Any, idle_wait: float = 0.05):
        self.engine, self.idle_wait = engine, idle_wait
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._live: dict[str, _Live] = {}
        self._wake = threading.Event()
        self._lock = threading.Lock()  # orders call() against close(): every call is answered
        self._stop = False
        self.error: BaseException | None = None
        self.stats: dict[str, Any] = dict(engine.stats)  # copied on the thread after each step
        # steps, step_seconds, prompt_tokens, finished_<reason>, aborted_by_client, ...
        self.counters: collections.Counter = collections.Counter()
        self._thread = threading.Thread(target=self._run, name="jengine-engine", daemon=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    @property
    def num_live(self) -> int:
        return len(self._live)

    def start(self) -> EngineLoop:
        self._thread.start()
        return self

    def call(self, fn: Callable[[Any], Any]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._stop or not self._thread.is_alive():
                future.set_exception(ApiError(503, "the engine is not running", code="shutdown"))
            else:
                self._calls.put((fn, future))
                self._wake.set()
        return future

    def submit(self, requests: Sequence[tuple[list[int], SamplingParams, str]],
               sink: Sink) -> concurrent.futures.Future:  # fmt: skip
        """Adds every (prompt, params, request id) or, if one is refused, none (the ones added
        are aborted again); the i-th request's outputs reach `sink` with key i."""

        def add(engine):
            if self.error is not None:
                raise ApiError(503, f"the engine failed: {self.error!r}", code="engine_error")
            if self._stop:
                raise ApiError(503, "the server is shutting down", code="shutdown")
            added = []
            try:
                for prompt, params, rid in requests:
                    added.append(engine.add_request(prompt, params, rid))
            except BaseException:
                for rid in added:
                    engine.abort(rid)
                raise
            for i, rid in enumerate(added):
                self._live[rid] = _Live(sink, i)
            self.counters["prompt_tokens"] += sum(len(p) for p, _, _ in requests)
            return added

        return self.call(add)

    def abort(self, request_ids: Sequence[str]) -> concurrent.futures.Future:
        """Aborts those of `request_ids` still running (their consumer has gone: nothing is
        delivered); their pages are freed before the next step."""

        def run(engine):
            for rid in request_ids:
                if self._live.pop(rid, None) is not None:
                    engine.abort(rid)
                    self.counters["aborted_by_client"] += 1
                    self.counters["finished_aborted"] += 1

        return self.call(run)

    def abort_all(self) -> concurrent.futures.Future:
        """Ends every request in flight with finish_reason 'aborted', delivered to its consumer
        (a server shutting down)."""
        return self.call(lambda engine: self._end_all("aborted", None))

    def close(self, timeout: float = 60.0) -> None:
        with self._lock:
            self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- on the thread ---------------------------------------------------------------------------

    def _run_calls(self) -> None:
        while True:
            try:
                fn, future = self._calls.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(self.engine))
            except BaseException as e:  # noqa: BLE001 -- handed to the caller
                future.set_exception(e)

    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stop:
                self._wake.clear()
                self._run_calls()
                if self.error is None and engine.has_unfinished_requests() and not engine.paused:
                    t0 = time.perf_counter()
                    try:
                        finished = engine.step()
                    except Exception as e:  # the engine is broken: fail what is in flight
                        log.exception("engine step failed")
                        self.error = e
                        self._end_all("error", repr(e))
                        continue
                    self.counters["steps"] += 1
                    self.counters["step_seconds"] += time.perf_counter() - t0
                    self._publish(finished)
                    self.stats = dict(engine.stats)
                else:
                    self.stats = dict(engine.stats)
                    self._wake.wait(self.idle_wait)
        finally:
            with self._lock:
                self._stop = True
            self._run_calls()  # calls queued before close() still get their answer
            self._end_all("aborted", None)
            self.stats = dict(engine.stats)

    def _end_all(self, reason: str, error: str | None) -> None:
        """Ends every live request with `reason` and hands each consumer its final output."""
        finished = []
        for rid in list(self._live):
            try:
                out = self.engine.abort(rid)
            except Exception:  # noqa: BLE001 -- a broken engine: still answer the consumer
                out = None
            if out is not None:
                finished.append(dataclasses.replace(out, finish_reason=reason, error=error))
        self._publish(finished)
        rest = {rid: _empty_output(rid, reason, error) for rid in self._live}
        self._publish(list(rest.values()))  # none unless abort() itself failed

    def _publish(self, finished: Sequence[Any]) -> None:
        done = {o.request_id: o for o in finished}
        batches: dict[Any, list] = collections.defaultdict(list)
        for rid, live in list(self._live.items()):
            out = done.get(rid)
            if out is not None:
                del self._live[rid]
                out = _tail(out, live.sent)
                self.counters[f"finished_{out.finish_reason}"] += 1
            else:
                out = self.engine.partial_output(rid, live.sent)
                if out is None:
                    continue
            live.sent += len(out.token_ids)
            batches[live.sink].append((live.key, out))
        by_loop: dict[Any, list] = collections.defaultdict(list)
        for (loop, q), items in batches.items():
            by_loop[loop].append((q, items))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the event loop is closed: nobody waits for these
                pass


def _tail(out: Any, start: int) -> Any:
    """A finished RequestOutput without its first `start` generated tokens."""
    if not start:
        return out
    top = out.top_logprobs[start:] if out.top_logprobs is not None else None
    return dataclasses.replace(out, token_ids=out.token_ids[start:], logprobs=out.logprobs[start:],
                               policy_versions=out.policy_versions[start:], top_logprobs=top)  # fmt: skip


def _empty_output(request_id: str, reason: str, error: str | None) -> Any:
    import numpy as np

    from jengine.engine import RequestOutput

    return RequestOutput(request_id, [], [], np.zeros(0, np.float32), np.zeros(0, np.int32),
                         reason, error=error)  # fmt: skip


# -- requests: JSON body -> prompts and SamplingParams -------------------------------------------

# Fields each endpoint reads, and fields accepted only at their neutral value (anything else would
# change what is sampled, so it is refused rather than ignored). Other fields are refused by name.
_COMMON_FIELDS = {
    "model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "seed", "stop",
    "stop_token_ids", "include_stop_str_in_output", "ignore_eos", "stream", "stream_options",
    "user", "return_token_ids", "return_token_logprobs", "return_policy_versions",
    "logprobs_encoding", "skip_special_tokens", "logprobs",
}  # fmt: skip
COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "echo", "best_of", "suffix", "add_special_tokens"}
CHAT_FIELDS = _COMMON_FIELDS | {
    "messages", "top_logprobs", "max_completion_tokens", "add_generation_prompt", "metadata",
    "store", "tools", "tool_choice", "parallel_tool_calls", "response_format",
}  # fmt: skip
_NEUTRAL = {  # field -> the values it may have
    "echo": (False, None), "suffix": (None, ""), "frequency_penalty": (0, 0.0, None),
    "presence_penalty": (0, 0.0, None), "repetition_penalty": (1, 1.0, None),
    "logit_bias": (None, {}), "min_tokens": (0, None), "tools": (None, []),
    "tool_choice": (None, "none"), "response_format": (None, {"type": "text"}),
}  # fmt: skip


def stop_fields(body: Mapping[str, Any]) -> dict[str, Any]:
    """The request's `stop` strings (and `include_stop_str_in_output`) as SamplingParams fields
    where SamplingParams has them; where it does not, a request that sets them is refused."""
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise ApiError(400, f"stop={body.get('stop')!r} must be a string or a list of strings",
                       "stop")  # fmt: skip
    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    out = {}
    if stop and "stop" not in fields:
        raise ApiError(400, "stop strings are not supported by this jengine version; use "
                       "stop_token_ids", "stop", "unsupported_parameter")  # fmt: skip
    if stop:
        out["stop"] = tuple(stop)
    include = body.get("include_stop_str_in_output")
    if include is not None and "include_stop_str_in_output" in fields:
        out["include_stop_str_in_output"] = include
    elif include:
        raise ApiError(400, "include_stop_str_in_output needs stop strings, which this jengine "
                       "version does not support", "include_stop_str_in_output")  # fmt: skip
    return out


def _check_fields(body: Mapping[str, Any], allowed: set[str]) -> None:
    for name, value in body.items():
        if name in _NEUTRAL:
            if value not in _NEUTRAL[name]:
                raise ApiError(400, f"{name}={value!r} is not supported (only "
                               f"{_NEUTRAL[name][0]!r})", name, "unsupported_parameter")  # fmt: skip
        elif name not in allowed:
            raise ApiError(400, f"unknown field {name!r}", name, "unsupported_parameter")


def _typed(body: Mapping[str, Any], name: str, kind: type | tuple, default: Any = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind in (int, (int, float)))
    if not ok:
        want = {bool: "a bool", int: "an int", str: "a string", dict: "an object",
                list: "a list"}.get(kind, "a number")  # fmt: skip
        raise ApiError(400, f"{name}={value!r} must be {want}", name)
    return value


@dataclasses.dataclass(frozen=True)
class Options:
    """What a request asks of the response beyond the samples."""

    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None  # None: no logprobs; else how many alternatives per token
    return_token_ids: bool
    return_token_logprobs: bool
    return_policy_versions: bool
    base64: bool
    skip_special_tokens: bool


def _options(body: Mapping[str, Any], logprobs: int | None) -> Options:
    n = _typed(body, "n", int, 1)
    if not 1 <= n <= MAX_N:
        raise ApiError(400, f"n={n} must be in [1, {MAX_N}]", "n")
    encoding = _typed(body, "logprobs_encoding", str, "float")
    if encoding not in ("float", "base64"):
        raise ApiError(400, f"logprobs_encoding={encoding!r} must be 'float' or 'base64'",
                       "logprobs_encoding")  # fmt: skip
    stream = _typed(body, "stream", bool, False)
    stream_options = _typed(body, "stream_options", dict, {})
    if stream_options and not stream:
        raise ApiError(400, "stream_options needs stream=true", "stream_options")
    return Options(
        n=n, stream=stream, include_usage=bool(stream_options.get("include_usage")),
        logprobs=logprobs, return_token_ids=_typed(body, "return_token_ids", bool, False),
        return_token_logprobs=_typed(body, "return_token_logprobs", bool, False),
        return_policy_versions=_typed(body, "return_policy_versions", bool, False),
        base64=encoding == "base64",
        skip_special_tokens=_typed(body, "skip_special_tokens", bool, True),
    )  # fmt: skip


def sampling_params(body: Mapping[str, Any], defaults: Mapping[str, Any], *, max_tokens: int,
                    top_n: int, n: int, logprobs_param: str) -> list[SamplingParams]:  # fmt: skip
    """The SamplingParams of the request's n choices: the server's `defaults` (its sampling
    flags), then the request's fields; choice i of a seeded request gets seed + i."""
    d = dict(defaults)
    for name in ("temperature", "top_p", "top_k", "min_p", "seed", "ignore_eos"):
        if body.get(name) is not None:
            d[name] = body[name]
    if body.get("stop_token_ids") is not None:
        ids = body["stop_token_ids"]
        if not isinstance(ids, list):
            raise ApiError(400, f"stop_token_ids={ids!r} must be a list of ints", "stop_token_ids")
        d["stop_token_ids"] = tuple(ids)
    d.update(stop_fields(body), max_tokens=max_tokens, logprobs=top_n)
    out = []
    for i in range(n):
        seed = d.get("seed")
        try:
            out.append(SamplingParams(**{**d, "seed": seed + i if _is_int(seed) else seed}))
        except (TypeError, ValueError) as e:
            m = re.match(r"(\w+)(\[\.\.\.\])?=", str(e))
            field = m.group(1) if m else None
            param = logprobs_param if field == "logprobs" else field
            message = str(e) if param == field else f"{param}: {e}"
            raise ApiError(400, message, param) from None
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _prompts(prompt: Any, tok: Any, add_special_tokens: bool) -> list[list[int]]:
    """/v1/completions' `prompt`: a string, a list of ints, or a list of either."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(
            _is_int(t) for t in prompt)):  # fmt: skip
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise ApiError(400, "prompt must be a string, a list of token ids, or a non-empty list of "
                       "either", "prompt")  # fmt: skip
    out = []
    for p in prompt:
        if isinstance(p, str):
            if tok is None:
                raise ApiError(400, "this server has no tokenizer: send prompts as token ids",
                               "prompt")  # fmt: skip
            p = tok.encode(p, add_special_tokens=add_special_tokens)
        elif not (isinstance(p, list) and all(_is_int(t) for t in p)):
            raise ApiError(400, "prompt must be a string, a list of token ids, or a list of "
                           "either", "prompt")  # fmt: skip
        if not p:
            raise ApiError(400, "prompt is empty", "prompt")
        out.append(p)
    return out


def _chat_prompt(body: Mapping[str, Any], tok: Any) -> list[int]:
    """The messages through the tokenizer's chat template, tokenized."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    if tok is None or tok.chat_template is None:
        raise ApiError(400, "this server's tokenizer has no chat template: use /v1/completions",
                       "messages")  # fmt: skip
    flat = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a string 'role'", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(c, dict) and c.get("type") == "text" for c in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                               "messages")  # fmt: skip
            content = "\n".join(str(c.get("text", "")) for c in content)
        elif content is not None and not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of parts",
                           "messages")  # fmt: skip
        flat.append({**m, "content": content or ""})
    generation_prompt = _typed(body, "add_generation_prompt", bool, True)
    try:
        return tok.encode(tok.apply_chat_template(flat, add_generation_prompt=generation_prompt))
    except Exception as e:  # noqa: BLE001 -- a template's own error, as the client's fault
        raise ApiError(400, f"chat template: {e}", "messages") from None


# -- responses -------------------------------------------------------------------------------------


class TextStream:
    """Detokenizes a growing token list into text deltas that only ever extend the text.

    Decodes a window (the tokens since the last emitted prefix) and holds the text back while
    it ends in an incomplete UTF-8 sequence; `finish()` returns the rest of the full decode.
    Without a tokenizer every text is "".
    """

    def __init__(self, tok: Any, skip_special_tokens: bool = True):
        self.tok, self.skip = tok, skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self._prefix = self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def push(self, ids: Sequence[int]) -> str:
        self.ids += ids
        if self.tok is None:
            return ""
        before = self._decode(self.ids[self._prefix : self._read])
        now = self._decode(self.ids[self._prefix :])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        delta = now[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta

    def push_text(self, text: str, final: bool, hold: int) -> str:
        """Extends the text towards `text`, the engine's own (vLLM's stop-string semantics: cut
        before a stop string once found): all of it at the end, else all but its last `hold`
        characters, which may be the start of a stop string not yet complete."""
        end = len(text) if final else max(len(text) - hold, len(self.text))
        delta = text[len(self.text) : end] if text.startswith(self.text) else ""
        self.text += delta
        return delta

    def finish(self) -> str:
        if self.tok is None:
            return ""
        full = self._decode(self.ids)
        delta = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text += delta
        return delta

    def push_output(self, out: Any, done: bool, hold: int | None) -> str:
        """The new text of `out`, a piece of a request's output (`done`: its last): the engine's
        own text when the request has stop strings (`hold`: the longest one's length - 1), else
        decoded here from its token ids."""
        if hold is not None and out.text is not None:
            return self.push_text(out.text, done, hold)
        return self.push(out.token_ids) + (self.finish() if done else "")


def _token_str(tok: Any, token_id: int) -> str:
    if tok is None:
        return f"token_id:{token_id}"
    return tok.decode([token_id], skip_special_tokens=False)


def _f(x: float) -> float:
    """A logprob for OpenAI's fields: -inf (a filtered alternative) becomes MIN_LOGPROB."""
    return max(float(x), MIN_LOGPROB) if not math.isnan(x) else x


def _extras(out: Any, opts: Options, first: bool) -> dict[str, Any]:
    """jengine's opt-in fields for one choice (chunk): ids, exact logprobs, policy versions."""
    extra: dict[str, Any] = {}
    if opts.return_token_ids:
        if first:
            extra["prompt_token_ids"] = list(out.prompt_token_ids)
        extra["token_ids"] = list(out.token_ids)
    if opts.return_token_logprobs:
        lp = out.logprobs
        if opts.base64:
            extra["token_logprobs"] = base64.b64encode(lp.astype("<f4").tobytes()).decode()
        else:  # float64 repr of the float32 value: parses back to the same float32 bits
            extra["token_logprobs"] = [float(x) if math.isfinite(x) else None for x in lp]
    if opts.return_policy_versions:
        extra["policy_versions"] = [int(v) for v in out.policy_versions]
    return extra


def _completion_logprobs(out: Any, tok: Any, offset: int) -> dict[str, Any]:
    """The legacy completions `logprobs` object of `out`'s tokens (text offsets from `offset`)."""
    tokens = [_token_str(tok, t) for t in out.token_ids]
    offsets = []
    for s in tokens:
        offsets.append(offset)
        offset += len(s)
    tops = []
    for i in range(len(tokens)):
        pairs = out.top_logprobs[i] if out.top_logprobs is not None else []
        top = {_token_str(tok, a): _f(v) for a, v in pairs}
        top.setdefault(tokens[i], _f(out.logprobs[i]))  # the sampled token is always listed
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": [_f(x) for x in out.logprobs],
            "top_logprobs": tops, "text_offset": offsets}  # fmt: skip


def _chat_logprobs(out: Any, tok: Any) -> dict[str, Any]:
    def entry(t: int, v: float) -> dict[str, Any]:
        s = _token_str(tok, t)
        return {"token": s, "logprob": _f(v), "bytes": list(s.encode("utf-8", "replace"))}

    content = []
    for i, t in enumerate(out.token_ids):
        top = out.top_logprobs[i] if out.top_logprobs is not None else []
        content.append({**entry(t, out.logprobs[i]), "top_logprobs": [entry(a, v) for a, v in top]})
    return {"content": content}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


# -- the app --------------------------------------------------------------------------------------


@dataclasses.dataclass
class _State:
    loop: EngineLoop
    tokenizer: Any
    config: ServerConfig
    model_name: str
    sampling_defaults: dict[str, Any]
    max_model_len: int
    created: int
    update_lock: asyncio.Lock | None = None
    http_errors: collections.Counter = dataclasses.field(default_factory=collections.Counter)


def _error_response(e: ApiError):
    from starlette.responses import JSONResponse

    return JSONResponse(e.body(), status_code=e.status)


def _key_ok(headers: Mapping[str, str], *keys: str | None) -> bool:
    got = headers.get("authorization", "")
    got = got[7:] if got[:7].lower() == "bearer " else ""
    return any(k is not None and hmac.compare_digest(got.encode(), k.encode()) for k in keys)


class _Auth:
    """ASGI middleware: with an API key, every path but /health needs `Authorization: Bearer
    <key>` (the admin key also passes); admin paths need the admin key, and are refused outright
    when none is configured."""

    def __init__(self, app: Any, state: _State):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            from starlette.datastructures import Headers

            cfg, headers, error = self.state.config, Headers(scope=scope), None
            if scope["path"] in ADMIN_PATHS:
                if cfg.admin_key is None:
                    error = ApiError(403, "admin endpoints are disabled: start the server with "
                                     "--admin_key (or $JENGINE_ADMIN_KEY)", code="admin_disabled")  # fmt: skip
                elif not _key_ok(headers, cfg.admin_key):
                    error = ApiError(401, "this endpoint needs the admin key (Authorization: "
                                     "Bearer <admin key>)", code="invalid_api_key")  # fmt: skip
            elif cfg.api_key is not None and not _key_ok(headers, cfg.api_key, cfg.admin_key):
                error = ApiError(401, "missing or incorrect API key (Authorization: Bearer <key>)",
                                 code="invalid_api_key")  # fmt: skip
            if error is not None:
                self.state.http_errors[error.status] += 1
                return await _error_response(error)(scope, receive, send)
        await self.app(scope, receive, send)


async def _json_body(request: Any) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}",
                       code="invalid_json")  # fmt: skip
    return body


def _check_model(state: _State, body: Mapping[str, Any]) -> None:
    model = body.get("model")
    if model is not None and model != state.model_name:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves "
                       f"{state.model_name!r}", "model", "model_not_found")  # fmt: skip


def _check_length(state: _State, prompts: list[list[int]], max_tokens: int, param: str) -> None:
    limit = state.max_model_len
    for p in prompts:
        if len(p) + max_tokens > limit:
            raise ApiError(400, f"this model's maximum context length is {limit} tokens; the "
                           f"request asks for {len(p) + max_tokens} ({len(p)} in the prompt, "
                           f"{max_tokens} in the completion)", param, "context_length_exceeded")  # fmt: skip


async def _engine_call(future: concurrent.futures.Future) -> Any:
    """The engine thread's answer; its ValueError/TypeError (a request the engine refuses) as a
    400."""
    try:
        return await asyncio.wrap_future(future)
    except (ValueError, TypeError, KeyError) as e:
        raise ApiError(400, str(e)) from None


class _Run:
    """One HTTP request's choices in the engine: its outputs arrive on an asyncio queue."""

    def __init__(self, state: _State, requests: list[tuple[list[int], SamplingParams]], kind: str):
        self.state, self.requests = state, requests
        self.id = f"{kind}-{uuid.uuid4().hex}"
        self.ids = [f"{self.id}-{i}" for i in range(len(requests))]
        self.queue: asyncio.Queue = asyncio.Queue()
        self.open = set(range(len(requests)))
        self._sink = (asyncio.get_running_loop(), self.queue)

    async def start(self) -> None:
        reqs = [(p, sp, rid) for (p, sp), rid in zip(self.requests, self.ids)]
        await _engine_call(self.state.loop.submit(reqs, self._sink))

    async def events(self, request: Any = None):
        """(choice index, RequestOutput) until every choice finished. With `request` (a plain
        response), a client that disconnects ends the wait; `close()` then aborts the rest."""
        while self.open:
            try:
                items = await asyncio.wait_for(self.queue.get(), 0.5)
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    return
                continue
            for i, out in items:
                if out.finish_reason is not None:
                    self.open.discard(i)
                yield i, out

    def close(self) -> None:
        """Aborts the choices still running (the client went away or the handler failed)."""
        if self.open:
            self.state.loop.abort([self.ids[i] for i in self.open])
            self.open = set()


def _parse(state: _State, body: dict[str, Any], chat: bool):
    """-> (prompts, [(prompt, params)] of every choice, options); raises ApiError."""
    _check_fields(body, CHAT_FIELDS if chat else COMPLETION_FIELDS)
    _check_model(state, body)
    tok = state.tokenizer
    if chat:
        prompts = [_chat_prompt(body, tok)]
        want_logprobs = _typed(body, "logprobs", bool, False)
        top_n = _typed(body, "top_logprobs", int, 0)
        if top_n and not want_logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        top_n = top_n if want_logprobs else None
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    else:
        best_of, n = body.get("best_of"), body.get("n", 1)
        if best_of is not None and best_of != n:
            raise ApiError(400, f"best_of={best_of!r} is not supported (only best_of == n)",
                           "best_of")  # fmt: skip
        add_special = _typed(body, "add_special_tokens", bool, True)
        prompts = _prompts(body.get("prompt"), tok, add_special)
        top_n = _typed(body, "logprobs", int)
        max_tokens, param = body.get("max_tokens"), "max_tokens"
    opts = _options(body, top_n)
    if max_tokens is None:  # chat: the rest of the context unless the server sets a default
        max_tokens = state.sampling_defaults.get("max_tokens")
        if max_tokens is None:
            max_tokens = state.max_model_len - max(map(len, prompts)) if chat else 16
            max_tokens = max(max_tokens, 1)
    elif not _is_int(max_tokens) or max_tokens < 1:
        raise ApiError(400, f"{param}={max_tokens!r} must be an int >= 1", param)
    _check_length(state, prompts, max_tokens, "messages" if chat else "prompt")
    params = sampling_params(body, state.sampling_defaults, max_tokens=max_tokens,
                             top_n=top_n or 0, n=opts.n,
                             logprobs_param="top_logprobs" if chat else "logprobs")  # fmt: skip
    return prompts, [(p, sp) for p in prompts for sp in params], opts


def _choice(state: _State, chat: bool, index: int, out: Any, text: str, offset: int,
            opts: Options, first: bool, delta: bool) -> dict[str, Any]:  # fmt: skip
    """One choice (of a response, or of a stream chunk when `delta`) for `out`'s new tokens,
    whose `text` starts at character `offset` of the choice's text."""
    tok = state.tokenizer
    reason = FINISH_REASONS.get(out.finish_reason) if out.finish_reason else None
    choice: dict[str, Any] = {"index": index}
    if chat:
        message = {"role": "assistant", "content": text} if (first or not delta) else {"content": text}
        choice["delta" if delta else "message"] = message
    else:
        choice["text"] = text
    logprobs = None
    if opts.logprobs is not None:
        logprobs = _chat_logprobs(out, tok) if chat else _completion_logprobs(out, tok, offset)
    choice["logprobs"] = logprobs
    choice["finish_reason"] = reason
    if out.error:
        choice["error"] = out.error
    choice.update(_extras(out, opts, first))
    return choice


async def _completions(request: Any, chat: bool):
    from starlette.responses import JSONResponse

    state: _State = request.app.state.jengine
    body = await _json_body(request)
    prompts, reqs, opts = _parse(state, body, chat)
    run = _Run(state, reqs, "chatcmpl" if chat else "cmpl")
    await run.start()
    created, kind = int(time.time()), "chat.completion" if chat else "text_completion"
    head = {"id": run.id, "object": kind, "created": created, "model": state.model_name}
    streams = [TextStream(state.tokenizer, opts.skip_special_tokens) for _ in reqs]
    # requests with stop strings take the engine's text (cut before the stop string); while
    # streaming, the longest stop string's possible start is held back. None: no stop string.
    holds = [max(map(len, sp.stop)) - 1 if sp.stop else None for _, sp in reqs]
    prompt_tokens = sum(map(len, prompts))
    if opts.stream:
        chunks = _stream(state, run, chat, head, opts, streams, prompt_tokens, holds)
        return _sse_response_class()(chunks, run.close)
    merged: dict[int, list] = collections.defaultdict(list)
    try:
        async for i, out in run.events(request):
            merged[i].append(out)
    finally:
        run.close()
    if len(merged) < len(reqs) or any(o[-1].finish_reason is None for o in merged.values()):
        return None  # the client disconnected; nobody reads a response
    choices = []
    for i in range(len(reqs)):
        out = _concat(merged[i])  # the last piece's text: the whole request's
        streams[i].push_output(out, True, holds[i])
        choices.append(_choice(state, chat, i, out, streams[i].text, 0, opts, True, False))
    completion_tokens = sum(len(c) for o in merged.values() for c in (x.token_ids for x in o))
    return JSONResponse({**head, "choices": choices,
                         "usage": _usage(prompt_tokens, completion_tokens)})  # fmt: skip


def _concat(outs: list) -> Any:
    """The pieces of one request's output, in order, as one RequestOutput."""
    import numpy as np

    last = outs[-1]
    if len(outs) == 1:
        return last
    top = None if last.top_logprobs is None else [r for o in outs for r in o.top_logprobs]
    return dataclasses.replace(
        last, token_ids=[t for o in outs for t in o.token_ids], top_logprobs=top,
        logprobs=np.concatenate([o.logprobs for o in outs]),
        policy_versions=np.concatenate([o.policy_versions for o in outs]),
    )  # fmt: skip


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def _stream(state: _State, run: _Run, chat: bool, head: dict, opts: Options,
                  streams: list[TextStream], prompt_tokens: int, holds: list[int | None]):  # fmt: skip
    """The SSE body: a chunk per choice and step with its new tokens, the usage chunk when asked,
    then [DONE]."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    head = {**head, "object": kind}
    first = [True] * len(streams)
    completion_tokens = 0
    try:
        async for i, out in run.events():
            offset = len(streams[i].text)
            text = streams[i].push_output(out, out.finish_reason is not None, holds[i])
            completion_tokens += len(out.token_ids)
            yield _sse({**head, "choices": [
                _choice(state, chat, i, out, text, offset, opts, first[i], delta=True)]})  # fmt: skip
            first[i] = False
        if opts.include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
    except Exception as e:  # noqa: BLE001 -- the status line is sent: report it in the stream
        log.exception("streaming failed")
        yield _sse(ApiError(500, f"internal error: {e!r}").body())
    yield "data: [DONE]\n\n"


@functools.cache
def _sse_response_class():
    from starlette.responses import StreamingResponse

    class SSE(StreamingResponse):
        """An event stream whose requests are aborted however it ends (client gone, cancelled)."""

        def __init__(self, body, on_close: Callable[[], None]):
            super().__init__(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})  # fmt: skip
            self.on_close = on_close

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.on_close()

    return SSE


def metrics_text(state: _State) -> str:
    """Prometheus text exposition of the server's and the engine's counters."""
    s, c, loop = state.loop.stats, state.loop.counters, state.loop
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: Mapping[str, float] | float) -> None:
        lines.append(f"# HELP jengine_{name} {help_}")
        lines.append(f"# TYPE jengine_{name} {kind}")
        for labels, value in (samples.items() if isinstance(samples, Mapping) else [("", samples)]):
            lines.append(f"jengine_{name}{labels} {value}")

    reasons = {f'{{finish_reason="{r}"}}': c[f"finished_{r}"] for r in FINISH_REASONS}
    metric("requests_total", "counter", "Engine requests finished, by finish reason.", reasons)
    metric("requests_aborted_by_client_total", "counter",
           "Requests aborted because their client disconnected.", c["aborted_by_client"])
    metric("requests_running", "gauge", "Requests in the running batch.", s["running"])
    metric("requests_waiting", "gauge", "Requests waiting to be scheduled.", s["waiting"])
    metric("prompt_tokens_total", "counter", "Prompt tokens of accepted requests.",
           c["prompt_tokens"])
    metric("generation_tokens_total", "counter", "Tokens generated.", s["generated_tokens"])
    metric("step_seconds", "summary", "Wall time of engine steps.",
           {"_sum": round(c["step_seconds"], 6), "_count": c["steps"]})
    metric("kv_pages_in_use", "gauge", "KV cache pages held by requests.",
           s["num_pages"] - s["num_pages_free"])
    metric("kv_pages_total", "gauge", "KV cache pages.", s["num_pages"])
    metric("preemptions_total", "counter", "Requests preempted (recomputed later).",
           s["preemptions"])
    metric("prefix_cache_hit_tokens_total", "counter", "Prompt tokens read from the prefix cache.",
           s["prefix_cache_hit_tokens"])
    metric("compilations_total", "counter", "Step shapes compiled.", s["compilations"])
    metric("compile_seconds_total", "counter", "Seconds spent compiling.", s["compile_seconds"])
    metric("verified_requests_total", "counter", "Requests re-scored by the parity guard.",
           s["verified_requests"])
    metric("verify_mismatches_total", "counter", "Parity-guard re-scores that differed.",
           s["verify_mismatches"])
    metric("policy_version", "gauge", "Policy version of the served weights.", s["policy_version"])
    metric("paused", "gauge", "1 while the engine is paused.", int(loop.engine.paused))
    errors = {f'{{status="{k}"}}': v for k, v in sorted(state.http_errors.items())} or 0
    metric("http_errors_total", "counter", "Requests answered with an error, by status.", errors)
    return "\n".join(lines) + "\n"


def _weights_path(config: ServerConfig, path: Any) -> str:
    """`path` (relative to weights_dir, or absolute) resolved; refused unless it lies inside
    weights_dir once symlinks are resolved."""
    if config.weights_dir is None:
        raise ApiError(403, "update_weights is disabled: start the server with --weights_dir",
                       code="weights_dir_unset")  # fmt: skip
    if not isinstance(path, str) or not path:
        raise ApiError(400, f"path={path!r} must be a non-empty string", "path")
    root = os.path.realpath(config.weights_dir)
    full = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([root, full]) != root:
        raise ApiError(403, f"path={path!r} is outside the weights directory", "path",
                       "path_not_allowed")  # fmt: skip
    if not os.path.isdir(full):
        raise ApiError(400, f"path={path!r}: no such checkpoint directory in the weights "
                       "directory", "path")  # fmt: skip
    return full


_CONFIG_FIELDS_ANY = ("name", "dtype", "eos_token_ids", "bos_token_id")  # may differ on update


async def _update_weights(request: Any):
    from starlette.responses import JSONResponse

    from jengine.engine import UPDATE_MODES
    from jengine.models.loading import load_model

    state: _State = request.app.state.jengine
    body = await _json_body(request)
    _check_fields(body, {"path", "mode"})
    mode = body.get("mode", "keep")
    if mode not in UPDATE_MODES:
        raise ApiError(400, f"mode={mode!r} must be one of {UPDATE_MODES}", "mode")
    full = _weights_path(state.config, body.get("path"))
    served = state.loop.engine.model.config
    async with state.update_lock:
        try:
            model = await asyncio.to_thread(load_model, full, dtype=served.dtype)
        except Exception as e:  # noqa: BLE001 -- an unreadable checkpoint is the caller's
            raise ApiError(400, f"path={body['path']!r}: {e}", "path") from None
        differ = [f.name for f in dataclasses.fields(served) if f.name not in _CONFIG_FIELDS_ANY
                  and getattr(served, f.name) != getattr(model.config, f.name)]  # fmt: skip
        if differ:
            raise ApiError(400, f"path={body['path']!r}: the checkpoint's model config differs "
                           f"from the served model's in {differ}", "path")  # fmt: skip
        version = await _engine_call(state.loop.call(
            lambda engine: engine.update_weights(model.params, mode=mode)))  # fmt: skip
    return JSONResponse({"policy_version": version, "mode": mode, "path": body["path"]})


def create_app(engine: Any, tokenizer: Any = None, config: ServerConfig | None = None, *,
               model_name: str = "jengine", sampling_defaults: Mapping[str, Any] | None = None):  # fmt: skip
    """The ASGI app serving `engine` (which it owns from startup to shutdown: its thread starts
    with the app's lifespan and stops with it, aborting what is still in flight).

    `sampling_defaults`: SamplingParams fields every request starts from (the server's sampling
    flags); a request's own fields override them. `app.state.jengine.loop` is the `EngineLoop`.
    """
    import contextlib

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    config = config or ServerConfig()
    defaults = dict(sampling_defaults or {})
    for name in ("seed", "logprobs"):  # per request only
        defaults.pop(name, None)
    SamplingParams(**defaults)  # a bad default fails here, not in every request
    state = _State(EngineLoop(engine), tokenizer, config, model_name, defaults,
                   engine.max_model_len, int(time.time()))  # fmt: skip

    def endpoint(fn):
        async def handle(request):
            try:
                return await fn(request) or Response(status_code=499)
            except ApiError as e:
                state.http_errors[e.status] += 1
                return _error_response(e)
            except Exception as e:  # noqa: BLE001 -- a bug: still an OpenAI-shaped answer
                log.exception("internal error on %s", request.url.path)
                state.http_errors[500] += 1
                return _error_response(ApiError(500, f"internal error: {e!r}"))

        return handle

    async def models(request):
        return JSONResponse({"object": "list", "data": [{
            "id": model_name, "object": "model", "created": state.created, "owned_by": "jengine",
            "max_model_len": state.max_model_len}]})  # fmt: skip

    async def health(request):
        if not state.loop.alive:
            raise ApiError(503, "the engine is not running" + (
                f": {state.loop.error!r}" if state.loop.error else ""), code="engine_down")  # fmt: skip
        return JSONResponse({"status": "ok"})

    async def metrics(request):
        return PlainTextResponse(metrics_text(state), media_type="text/plain; version=0.0.4")

    def admin(method: str):
        async def run(request):
            await _engine_call(state.loop.call(lambda e: getattr(e, method)()))
            return JSONResponse({"paused": method == "pause"})

        return run

    async def http_error(request, exc):  # unknown paths and methods, OpenAI-shaped
        state.http_errors[exc.status_code] += 1
        return _error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: "
                                        f"{exc.detail}"))  # fmt: skip

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.update_lock = asyncio.Lock()
        state.loop.start()
        try:
            yield
        finally:
            state.loop.close()
            engine.close()

    routes = [
        Route("/v1/completions", endpoint(lambda r: _completions(r, chat=False)), methods=["POST"]),
        Route("/v1/chat/completions", endpoint(lambda r: _completions(r, chat=True)),
              methods=["POST"]),
        Route("/v1/models", endpoint(models), methods=["GET"]),
        Route("/health", endpoint(health), methods=["GET"]),
        Route("/metrics", endpoint(metrics), methods=["GET"]),
        Route("/update_weights", endpoint(_update_weights), methods=["POST"]),
        Route("/pause", endpoint(admin("pause")), methods=["POST"]),
        Route("/resume", endpoint(admin("resume")), methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error})  # fmt: skip
    app.state.jengine = state
    app.add_middleware(_Auth, state=state)
    return app


FLUSH_SECONDS = 5.0  # after aborting at shutdown, how long the streams get to send their ends


def _uvicorn_server(app: Any, shutdown_timeout: float, **kwargs: Any) -> Any:
    """A uvicorn server whose graceful shutdown (SIGINT/SIGTERM) lets in-flight requests run
    `shutdown_timeout` seconds, then aborts them in the engine, so that every open stream still
    ends with finish_reason 'abort' and [DONE]; uvicorn cancels what is left FLUSH_SECONDS later."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            async def abort_later():
                await asyncio.sleep(shutdown_timeout)
                await asyncio.wrap_future(app.state.jengine.loop.abort_all())

            task = asyncio.create_task(abort_later())
            try:
                await super().shutdown(sockets)
            finally:
                task.cancel()

    config = uvicorn.Config(app, timeout_graceful_shutdown=shutdown_timeout + FLUSH_SECONDS,
                            **kwargs)  # fmt: skip
    return Server(config)


def serve(engine: Any, tokenizer: Any = None, config: ServerConfig | None = None, *,
          model_name: str = "jengine", sampling_defaults: Mapping[str, Any] | None = None) -> None:  # fmt: skip
    """Serves until SIGINT/SIGTERM: then stops listening, lets in-flight requests run up to
    `config.shutdown_timeout` seconds, aborts the rest and returns (the process exits 0)."""
    import signal

    config = config or ServerConfig()
    if config.warmup:
        t0 = time.perf_counter()
        n = engine.warmup()
        log.warning("compiled %d step buckets in %.1fs", n, time.perf_counter() - t0)
    app = create_app(engine, tokenizer, config, model_name=model_name,
                     sampling_defaults=sampling_defaults)  # fmt: skip
    # uvicorn restores the handlers it found and raises the signal again once it has shut down
    # gracefully: these take it, so a requested shutdown returns instead of killing the process
    main = threading.current_thread() is threading.main_thread()
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda *_: None) for s in signals} if main else {}
    try:
        _uvicorn_server(app, config.shutdown_timeout, host=config.host, port=config.port).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class BackgroundServer:
    """Serves an app from `create_app` on a background thread (tests, notebooks, benchmarks):

        with BackgroundServer(create_app(engine, tok)) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="-")

    `port=0` takes a free port. Leaving the block stops the server like SIGTERM does (in-flight
    requests may run `shutdown_timeout` seconds, then are aborted) and stops the engine thread.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0,
                 shutdown_timeout: float = 5.0):  # fmt: skip
        self.app, self.host, self.port, self.shutdown_timeout = app, host, port, shutdown_timeout
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        import socket

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._server = _uvicorn_server(self.app, self.shutdown_timeout, log_level="warning")
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="jengine-http", daemon=True)  # fmt: skip
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server thread exited before it started listening")
            time.sleep(0.01)
        return self

    def __exit__(self, *_: Any) -> None:
        self._server.should_exit = True
        self._thread.join()
