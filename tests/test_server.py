"""`jengine serve` on the loopback address, driven by the real `openai` client and raw HTTP.

Proves: completions and chat (text, token ids, lists, n, streaming, logprobs, jengine's extras)
give bitwise the tokens and logprobs of `Engine.generate` for the same prompt and seed, alone and
among 64 concurrent streams; bad requests get OpenAI-shaped 4xx errors; every endpoint but
/health needs the key, admin endpoints the admin key, and update_weights stays inside its
directory; a client that disconnects frees its pages; pause holds requests until resume;
weight updates reach the next request. The slow tier runs the load test and the CLI under SIGTERM.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from jengine import Engine, EngineConfig, Model, SamplingParams, save_model
from jengine.server import BackgroundServer, ServerConfig, TextStream, create_app
from jengine.tokenizer import Tokenizer
from tests.conftest import random_prompts, same_bits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = dict(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64)  # test_engine.py's
KEY, ADMIN = "test-key", "admin-key"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # fmt: skip
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Héllo wörld, ça va? 東京 ☕",
          "Name three primes: 2, 3 and 5.", "def add(a, b):\n    return a + b"] * 20  # fmt: skip


def byte_level_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE with ChatML specials (ids 0-3: <s>, </s>, <|im_start|>, <|im_end|>) and
    a chat template: random models sample invalid UTF-8 through it, as real ones can."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    backend.train_from_iterator(CORPUS, trainer)
    return Tokenizer(backend=backend, chat_template=CHATML, bos_token_id=0, eos_token_ids=(1,))


@pytest.fixture(scope="module")
def tok(tiny_model):
    t = byte_level_tokenizer(tiny_model.config.vocab_size)
    assert t.vocab_size <= tiny_model.config.vocab_size
    return t


@pytest.fixture(scope="module")
def reference(tiny_model):
    """The in-process engine the server's outputs must equal."""
    return Engine(tiny_model, EngineConfig(**BASE))


@pytest.fixture(scope="module")
def server(tiny_model, tok, tmp_path_factory):
    weights_dir = tmp_path_factory.mktemp("weights")
    engine = Engine(tiny_model, EngineConfig(**BASE), tokenizer=tok)
    config = ServerConfig(api_key=KEY, admin_key=ADMIN, weights_dir=str(weights_dir))
    with BackgroundServer(create_app(engine, tok, config, model_name="tiny")) as s:
        s.engine, s.loop, s.weights_dir = engine, s.app.state.jengine.loop, weights_dir
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def f32(values) -> np.ndarray:
    return np.asarray(values, np.float32)


def test_completions_match_engine_generate(client, tok, reference):
    text = "Name three primes:"
    ids = random_prompts(2, 512, seed=1)
    r = client.completions.create(
        model="tiny", prompt=[text, *ids], max_tokens=6, temperature=0.8, top_p=0.9, seed=7, n=2,
        logprobs=3, extra_body=dict(top_k=40, return_token_ids=True, return_token_logprobs=True,
                                    return_policy_versions=True),
    )  # fmt: skip
    prompts = [tok.encode(text, add_special_tokens=True), *ids]
    params = [SamplingParams(temperature=0.8, top_p=0.9, top_k=40, max_tokens=6, seed=7 + j,
                             logprobs=3) for j in range(2)]  # fmt: skip
    want = reference.generate([p for p in prompts for _ in params], params * len(prompts))
    assert len(r.choices) == 6
    for c, w in zip(r.choices, want):
        extra = c.model_extra
        assert extra["prompt_token_ids"] == w.prompt_token_ids
        assert extra["token_ids"] == w.token_ids
        assert same_bits(extra["token_logprobs"], w.logprobs)
        assert same_bits(c.logprobs.token_logprobs, w.logprobs)  # the OpenAI field too
        assert extra["policy_versions"] == [0] * len(w.token_ids)
        assert c.text == tok.decode(w.token_ids)
        assert c.finish_reason == {"length": "length", "stop": "stop"}[w.finish_reason]
        for top, pairs, t in zip(c.logprobs.top_logprobs, w.top_logprobs, w.token_ids):
            assert set(top) == {tok.decode([a], skip_special_tokens=False) for a, _ in pairs} | {
                tok.decode([t], skip_special_tokens=False)}  # fmt: skip
    assert r.usage.prompt_tokens == sum(map(len, prompts))
    assert r.usage.completion_tokens == sum(len(w.token_ids) for w in want)


def test_chat_matches_engine_generate(client, tok, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    r = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=5, temperature=1.0, seed=3, logprobs=True,
        top_logprobs=2, extra_body=dict(min_p=0.01, return_token_ids=True,
                                        return_token_logprobs=True, logprobs_encoding="base64"),
    )  # fmt: skip
    prompt = tok.encode(tok.apply_chat_template(messages))
    (w,) = reference.generate([prompt], SamplingParams(max_tokens=5, seed=3, min_p=0.01,
                                                       logprobs=2))  # fmt: skip
    (c,) = r.choices
    assert c.model_extra["prompt_token_ids"] == prompt and c.model_extra["token_ids"] == w.token_ids
    exact = np.frombuffer(base64.b64decode(c.model_extra["token_logprobs"]), "<f4")
    assert same_bits(exact, w.logprobs)
    assert same_bits([e.logprob for e in c.logprobs.content], w.logprobs)
    assert [len(e.top_logprobs) for e in c.logprobs.content] == [2] * len(w.token_ids)
    assert c.message.role == "assistant" and c.message.content == tok.decode(w.token_ids)


def test_streaming_equals_the_response(client, tok):
    kw = dict(model="tiny", max_tokens=12, seed=11, extra_body=dict(return_token_ids=True))
    whole = client.completions.create(prompt="def add(a, b):", **kw)
    chunks = list(client.completions.create(prompt="def add(a, b):", stream=True,
                                            stream_options={"include_usage": True}, **kw))  # fmt: skip
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    body = chunks[:-1]
    ids = [t for c in body for t in c.choices[0].model_extra["token_ids"]]
    assert ids == whole.choices[0].model_extra["token_ids"] and len(body) == len(ids)
    assert "".join(c.choices[0].text for c in body) == whole.choices[0].text == tok.decode(ids)
    assert [c.choices[0].finish_reason for c in body][-1] == whole.choices[0].finish_reason

    messages = [{"role": "user", "content": "Héllo wörld ☕"}]
    whole = client.chat.completions.create(messages=messages, **kw)
    chunks = list(client.chat.completions.create(messages=messages, stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == \
        whole.choices[0].message.content  # fmt: skip
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_text_stream_never_splits_a_character(tok):
    """Random byte-level tokens (invalid UTF-8 among them): no delta but the last ends in a
    replacement character, and the deltas add up to the decode of all the tokens."""
    rng = np.random.default_rng(0)
    invalid = 0
    for _ in range(20):
        ids = list(map(int, rng.integers(4, tok.vocab_size, 30)))
        ts = TextStream(tok)
        deltas = [ts.push([t]) for t in ids] + [ts.finish()]
        assert "".join(deltas) == tok.decode(ids)
        assert not any(d.endswith("\ufffd") for d in deltas[:-1])
        invalid += "\ufffd" in tok.decode(ids)
    assert invalid  # the case the hold-back exists for did occur


def test_64_concurrent_streams_are_bitwise_generate(server, reference):
    prompts = random_prompts(64, 512, lo=2, hi=30, seed=5)
    rng = np.random.default_rng(5)
    params = [SamplingParams(temperature=float(rng.choice([0.0, 0.7, 1.0])), max_tokens=int(
        rng.integers(1, 10)), seed=100 + i, top_k=int(rng.choice([0, 20]))) for i in range(64)]  # fmt: skip

    async def stream(c, p, sp):
        body = dict(prompt=p, max_tokens=sp.max_tokens, temperature=sp.temperature, seed=sp.seed,
                    top_k=sp.top_k, stream=True, return_token_ids=True,
                    return_token_logprobs=True)  # fmt: skip
        ids, lps = [], []
        async with c.stream("POST", "/v1/completions", json=body, headers=auth()) as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    ids += choice["token_ids"]
                    lps += choice["token_logprobs"]
        return ids, lps

    async def everything():
        limits = httpx.Limits(max_connections=80)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=120) as c:
            return await asyncio.gather(*[stream(c, p, sp) for p, sp in zip(prompts, params)])

    got = asyncio.run(everything())
    want = reference.generate(prompts, params)
    for i in (0, 17, 63):  # generate() of a batch is each request alone (tests/test_engine.py)
        (alone,) = reference.generate([prompts[i]], params[i])
        assert alone.token_ids == want[i].token_ids and same_bits(alone.logprobs, want[i].logprobs)
    for (ids, lps), w in zip(got, want):
        assert ids == w.token_ids and same_bits(lps, w.logprobs)


BAD_REQUESTS = [  # (path, body, status, param)
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 2}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10_000}, 400, "prompt"),
    ("/v1/completions", {"prompt": [5] * 300}, 400, "prompt"),
    ("/v1/completions", {"prompt": [5, 99999]}, 400, None),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "seed": -1}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "echo": True}, 400, "echo"),
    ("/v1/completions", {"prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "top_logprobs": 21, "logprobs": True}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "top_logprobs": 2}, 400, "top_logprobs"),
]  # fmt: skip


@pytest.mark.parametrize("path,body,status,param", BAD_REQUESTS,
                         ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD_REQUESTS)])  # fmt: skip
def test_bad_request_gets_an_openai_error(server, path, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + path, content=content, headers=auth(), timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param


def test_stop_strings_pass_through_or_are_refused(server):
    from jengine.server import stop_fields

    supported = "stop" in {f.name for f in __import__("dataclasses").fields(SamplingParams)}
    r = httpx.post(server.url + "/v1/completions", headers=auth(), timeout=30,
                   json={"prompt": [5, 6], "max_tokens": 2, "stop": ["\n"]})  # fmt: skip
    assert r.status_code == (200 if supported else 400), r.text
    if not supported:
        assert r.json()["error"]["param"] == "stop" and "not supported" in r.text
    assert stop_fields({"stop": None}) == {} and stop_fields({"stop": []}) == {}


def test_stop_string_cuts_the_text_streamed_or_not(server):
    """The text ends before a stop string found in the generated text (vLLM's semantics), and a
    stream never sends characters the final text does not have."""
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 12, "seed": 3, "ignore_eos": True}
    full = httpx.post(server.url + "/v1/completions", headers=auth(), timeout=30,
                      json=body).json()["choices"][0]["text"]  # fmt: skip
    stop = next(full[i : i + 2] for i in range(2, len(full) - 1)
                if "\ufffd" not in full[i : i + 2] and full[i : i + 2].strip())  # fmt: skip
    want = full[: full.index(stop)]
    r = httpx.post(server.url + "/v1/completions", headers=auth(), timeout=30,
                   json={**body, "stop": [stop]})  # fmt: skip
    assert r.json()["choices"][0]["text"] == want and r.json()["choices"][0]["finish_reason"] == "stop"
    with httpx.stream("POST", server.url + "/v1/completions", headers=auth(), timeout=30,
                      json={**body, "stop": [stop], "stream": True}) as r:  # fmt: skip
        chunks = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: {")]  # fmt: skip
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == want


def test_wrong_method_and_path_are_openai_errors(server):
    r = httpx.get(server.url + "/v1/completions", headers=auth())
    assert r.status_code == 405 and r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/nothing", headers=auth())
    assert r.status_code == 404 and r.json()["error"]["message"]


ENDPOINTS = [("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions"),
             ("POST", "/v1/chat/completions"), ("POST", "/update_weights"), ("POST", "/pause"),
             ("POST", "/resume"), ("GET", "/v1/nothing")]  # fmt: skip


def test_every_endpoint_but_health_needs_the_key(server):
    for method, path in ENDPOINTS:
        for headers in ({}, auth("wrong"), {"Authorization": KEY}):
            r = httpx.request(method, server.url + path, headers=headers, json={})
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    for path in ("/pause", "/resume", "/update_weights"):  # the API key is not the admin key
        assert httpx.post(server.url + path, headers=auth(), json={}).status_code == 401
    models = openai.OpenAI(base_url=server.url + "/v1", api_key=ADMIN).models.list()
    assert [m.id for m in models.data] == ["tiny"]  # the admin key opens the API too


def test_admin_endpoints_are_refused_without_an_admin_key(tiny_model):
    from starlette.testclient import TestClient

    app = create_app(Engine(tiny_model, EngineConfig(**BASE)), config=ServerConfig())
    with TestClient(app) as c:
        for path in ("/pause", "/resume", "/update_weights"):
            r = c.post(path, json={"path": "x"}, headers=auth(ADMIN))
            assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"
        assert c.get("/v1/models").status_code == 200  # no API key configured: open
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]


def test_update_weights_stays_inside_its_directory(server, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, server.weights_dir / "link")
    for path in ("../outside", str(outside), "link", "link/.."):
        r = httpx.post(server.url + "/update_weights", headers=auth(ADMIN),
                       json={"path": path, "mode": "keep"})  # fmt: skip
        assert r.status_code == 403 and r.json()["error"]["code"] == "path_not_allowed", path
    for body in ({"path": "missing"}, {"path": "link", "mode": "sideways"}, {"path": 3}):
        r = httpx.post(server.url + "/update_weights", headers=auth(ADMIN), json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] in ("path", "mode"), body


def test_client_disconnect_aborts_and_frees_pages(server):
    before = server.loop.counters["aborted_by_client"]
    body = dict(prompt=[5] * 40, max_tokens=200, stream=True, ignore_eos=True)
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=auth()) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # one chunk, then the client goes away
    deadline = time.monotonic() + 60
    while server.loop.num_live and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.loop.num_live == 0
    assert server.loop.counters["aborted_by_client"] == before + 1
    stats = server.loop.call(lambda e: (e.check_invariants(), e.stats)[1]).result(30)
    assert stats["num_pages_free"] == stats["num_pages"] and stats["running"] == 0
    m = httpx.get(server.url + "/metrics", headers=auth()).text
    assert "\njengine_kv_pages_in_use 0\n" in m
    for name in ("requests_total", "generation_tokens_total", "step_seconds_sum",
                 "preemptions_total", "compilations_total", "verified_requests_total",
                 "verify_mismatches_total", "kv_pages_total", "policy_version"):  # fmt: skip
        assert f"\njengine_{name}" in m, name


def test_a_plain_request_whose_client_left_is_aborted(server):
    before = server.loop.counters["aborted_by_client"]
    httpx.post(server.url + "/pause", headers=auth(ADMIN))  # it waits: only the client can end it
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", headers=auth(), timeout=0.3,
                       json={"prompt": [5, 6], "max_tokens": 4})  # fmt: skip
        deadline = time.monotonic() + 30
        while server.loop.num_live and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.loop.num_live == 0
        assert server.loop.counters["aborted_by_client"] == before + 1
    finally:
        httpx.post(server.url + "/resume", headers=auth(ADMIN))


def test_pause_holds_requests_until_resume(server, client):
    assert httpx.post(server.url + "/pause", headers=auth(ADMIN)).json() == {"paused": True}
    result = {}
    t = threading.Thread(target=lambda: result.update(r=client.completions.create(
        model="tiny", prompt=[7, 8, 9], max_tokens=3, seed=0)))  # fmt: skip
    t.start()
    t.join(0.5)
    assert t.is_alive()  # a paused engine finishes nothing
    assert "\njengine_paused 1\n" in httpx.get(server.url + "/metrics", headers=auth()).text
    assert httpx.post(server.url + "/resume", headers=auth(ADMIN)).json() == {"paused": False}
    t.join(60)
    assert result["r"].choices[0].finish_reason == "length"


def test_update_weights_reaches_the_next_request(server, client, tiny_model):
    from benchmarks.load_test import perturbed

    new = Model(tiny_model.config, perturbed(tiny_model.params, 7))
    save_model(new, str(server.weights_dir / "v1"))
    save_model(tiny_model, str(server.weights_dir / "v0"))
    r = httpx.post(server.url + "/update_weights", headers=auth(ADMIN),
                   json={"path": "v1", "mode": "keep"})  # fmt: skip
    assert r.status_code == 200, r.text
    version = r.json()["policy_version"]
    try:
        got = client.completions.create(model="tiny", prompt=[3, 4, 5], max_tokens=4, seed=1,
                                        extra_body=dict(return_token_ids=True,
                                                        return_token_logprobs=True,
                                                        return_policy_versions=True))  # fmt: skip
        (w,) = Engine(new, EngineConfig(**BASE)).generate([[3, 4, 5]], SamplingParams(
            max_tokens=4, seed=1))  # fmt: skip
        extra = got.choices[0].model_extra
        assert extra["policy_versions"] == [version] * len(w.token_ids)
        assert extra["token_ids"] == w.token_ids and same_bits(extra["token_logprobs"], w.logprobs)
    finally:  # the module's other tests compare against the original weights
        r = httpx.post(server.url + "/update_weights", headers=auth(ADMIN), json={"path": "v0"})
        assert r.json()["policy_version"] == version + 1


def test_shutdown_aborts_what_is_still_in_flight(tiny_model):
    engine = Engine(tiny_model, EngineConfig(**BASE))
    server = BackgroundServer(create_app(engine, config=ServerConfig(admin_key=ADMIN)),
                              shutdown_timeout=0.2).__enter__()  # fmt: skip
    body = dict(prompt=[5] * 40, max_tokens=100, stream=True, return_token_ids=True)
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))  # running, pages held
        httpx.post(server.url + "/pause", headers=auth(ADMIN))  # it cannot finish now
        server.__exit__()  # stops like SIGTERM: waits 0.2 s, then aborts it
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"  # the stream ends whole
    assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "abort"
    assert not server.app.state.jengine.loop.alive and not engine.has_unfinished_requests()
    assert engine.stats["num_pages_free"] == engine.stats["num_pages"]
    engine.check_invariants()


# -- slow tier ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_load_with_disconnects_and_updates(tiny_model, tmp_path):
    from benchmarks.serve_load import ADMIN_KEY, CONFIG, run_load

    engine = Engine(tiny_model, EngineConfig(**CONFIG))
    config = ServerConfig(admin_key=ADMIN_KEY, weights_dir=str(tmp_path))
    with BackgroundServer(create_app(engine, config=config, model_name="tiny")) as s:
        r = run_load(s.url, tiny_model, str(tmp_path), n=80)
        s.app.state.jengine.loop.call(lambda e: e.check_invariants()).result(30)
    assert r["pages_in_use_after"] == 0 and r["disconnected"] > 0 and r["compared"] > 0
    assert r["finish_reasons"].get("abort", 0) > 0  # the abort-mode update caught some
    assert r["updates"] == ["keep->v1", "abort->v2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_cli_serves_and_exits_cleanly_on_sigterm(tmp_path, tok):
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "jengine", "serve", "--model=tiny", f"--port={port}",
         f"--tokenizer={tmp_path / 'tokenizer.json'}", "--max_model_len=256", "--max_num_seqs=8",
         "--max_num_batched_tokens=64", "--warmup=false", "--shutdown_timeout=60",
         "--temperature=0"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "JENGINE_API_KEY": KEY},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
                time.sleep(0.3)
        assert httpx.get(url + "/v1/models").status_code == 401  # the key from the environment
        c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        r = c.completions.create(model="tiny", prompt="The quick", max_tokens=4)
        greedy = c.completions.create(model="tiny", prompt="The quick", max_tokens=4, seed=9)
        assert r.choices[0].text == greedy.choices[0].text  # --temperature=0: the default
        stream = c.completions.create(model="tiny", prompt=[5] * 10, max_tokens=120, stream=True,
                                      extra_body={"ignore_eos": True})  # fmt: skip
        first = next(iter(stream))
        proc.send_signal(signal.SIGTERM)  # in flight: it finishes, then the server exits
        rest = list(stream)
        assert first.choices[0].finish_reason is None
        assert rest[-1].choices[0].finish_reason == "length"
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
