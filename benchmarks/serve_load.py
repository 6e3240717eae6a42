"""Load test of `jengine serve`: concurrent streaming requests with random lengths and sampling
params, random client disconnects and weight updates in the middle; then the server's tokens/s
against in-process `Engine.generate` on the same workload.

    python benchmarks/serve_load.py --n 500          # the server in a subprocess (jengine serve)

Checks (AssertionError on a violation):
  * every request whose client stayed ends once, with [DONE] and a finish reason (stop, length, or
    abort when an abort-mode update caught it in flight), within its max_tokens;
  * once every client is done, no request runs or waits and no KV page is in use (/metrics);
  * a sample of the requests that ran entirely between two updates give bitwise the tokens and
    logprobs of `Engine.generate` alone with those weights.
`tests/test_server.py` runs `run_load` at CI size on a server in the test's process.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.load_test import make_requests, perturbed  # noqa: E402
from jengine import Engine, EngineConfig, Model, load_model, save_model  # noqa: E402

ADMIN_KEY = "load-test-admin"
# enough room for every request of the workload at once: 128 running, the rest waiting
CONFIG = dict(max_model_len=96, max_num_seqs=128, max_num_batched_tokens=256, page_size=8)


def request_body(prompt: list[int], sp, stream: bool = True) -> dict:
    """The /v1/completions body of one (prompt, SamplingParams), with jengine's extras."""
    return dict(prompt=prompt, temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p,
                min_p=sp.min_p, max_tokens=sp.max_tokens, seed=sp.seed, ignore_eos=sp.ignore_eos,
                stop_token_ids=list(sp.stop_token_ids), stream=stream, return_token_ids=True,
                return_token_logprobs=True, logprobs_encoding="base64",
                return_policy_versions=True)  # fmt: skip


async def _one(client: httpx.AsyncClient, body: dict, disconnect_after: int | None) -> dict:
    """Streams one request; closes the connection after `disconnect_after` chunks if set."""
    r = dict(tokens=[], logprobs=b"", versions=[], finish=[], done=False, disconnected=False,
             sent=time.perf_counter())  # fmt: skip
    if not body["stream"]:
        resp = await client.post("/v1/completions", json=body)
        assert resp.status_code == 200, (resp.status_code, resp.text)
        (choice,) = resp.json()["choices"]
        r.update(tokens=choice["token_ids"], logprobs=base64.b64decode(choice["token_logprobs"]),
                 versions=choice["policy_versions"], finish=[choice["finish_reason"]], done=True,
                 ended=time.perf_counter())  # fmt: skip
        return r
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200, (resp.status_code, await resp.aread())
        chunks = 0
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                r["done"] = True
                continue
            assert not r["done"], "a chunk after [DONE]"
            (choice,) = json.loads(line[6:])["choices"]
            r["tokens"] += choice["token_ids"]
            r["logprobs"] += base64.b64decode(choice["token_logprobs"])
            r["versions"] += choice["policy_versions"]
            if choice["finish_reason"] is not None:
                r["finish"].append(choice["finish_reason"])
            chunks += 1
            if disconnect_after is not None and chunks >= disconnect_after and not r["finish"]:
                r["disconnected"] = True
                break
    r["ended"] = time.perf_counter()
    return r


async def _update(client: httpx.AsyncClient, path: str, mode: str) -> dict:
    t0 = time.perf_counter()
    resp = await client.post("/update_weights", json={"path": path, "mode": mode},
                             headers={"Authorization": f"Bearer {ADMIN_KEY}"})  # fmt: skip
    assert resp.status_code == 200, resp.text
    return dict(start=t0, end=time.perf_counter(), version=resp.json()["policy_version"])


async def drive(url: str, bodies: list[dict], disconnect_after: list[int | None],
                updates: list[tuple[int, str, str]] = ()) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """Sends every body at once; update (k, path, mode) is posted when k requests have ended.
    Returns (per-request results, per-update results)."""
    limits = httpx.Limits(max_connections=len(bodies) + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:
        ended = asyncio.Event()
        count = [0]

        async def one(body, k):
            try:
                return await _one(client, body, k)
            finally:
                count[0] += 1
                ended.set()

        async def updater():
            done = []
            for k, path, mode in updates:
                while count[0] < k:
                    ended.clear()
                    await ended.wait()
                done.append(await _update(client, path, mode))
            return done

        tasks = [asyncio.create_task(one(b, k)) for b, k in zip(bodies, disconnect_after)]
        done_updates = await updater()
        return list(await asyncio.gather(*tasks)), done_updates


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {m[0]: float(m[1]) for m in re.findall(r"^(jengine_\w+(?:\{[^}]*\})?) (\S+)$", text,
                                                   re.M)}  # fmt: skip


def wait_drained(url: str, timeout: float = 120.0) -> dict[str, float]:
    """/metrics once nothing runs or waits (a disconnect's abort lands between two steps)."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if m["jengine_requests_running"] == m["jengine_requests_waiting"] == 0:
            return m
        assert time.monotonic() < deadline, f"requests still in flight: {m}"
        time.sleep(0.05)


def run_load(url: str, model: Model, weights_dir: str, n: int = 64, *, seed: int = 0,
             disconnect_prob: float = 0.15, update_modes: tuple[str, ...] = ("keep", "abort"),
             compare: int = 6, engine_config: dict | None = None,
             max_tokens_hi: int = 24) -> dict:  # fmt: skip
    """The load test against the server at `url` (serving `model`, `engine_config`, admin key
    ADMIN_KEY, weights dir `weights_dir`); returns its figures."""
    rng = np.random.default_rng(seed)
    requests = make_requests(n, model.config.vocab_size, rng, max_tokens_hi=max_tokens_hi)
    disconnect = [int(rng.integers(1, sp.max_tokens)) if sp.max_tokens > 1
                  and rng.random() < disconnect_prob else None for _, sp in requests]  # fmt: skip
    params_of = {0: model.params}
    updates = []
    for i, mode in enumerate(update_modes):
        params_of[i + 1] = perturbed(model.params, 1000 + i)
        path = f"v{i + 1}"
        save_model(Model(model.config, params_of[i + 1]), os.path.join(weights_dir, path))
        updates.append(((i + 1) * n // (len(update_modes) + 2), path, mode))  # n/4, n/2
    t0 = time.perf_counter()
    results, done_updates = asyncio.run(
        drive(url, [request_body(p, sp) for p, sp in requests], disconnect, updates))
    wall = time.perf_counter() - t0
    m = wait_drained(url)

    reasons: dict[str, int] = {}
    for (prompt, sp), r in zip(requests, results):
        assert len(r["tokens"]) == len(r["logprobs"]) // 4 == len(r["versions"]) <= sp.max_tokens
        if r["disconnected"]:
            continue
        assert r["done"] and len(r["finish"]) == 1, r
        reasons[r["finish"][0]] = reasons.get(r["finish"][0], 0) + 1
    assert set(reasons) <= {"stop", "length", "abort"}, reasons
    assert m["jengine_kv_pages_in_use"] == 0, f"{m['jengine_kv_pages_in_use']} pages leaked"
    assert [u["version"] for u in done_updates] == list(range(1, len(updates) + 1))

    def clean_version(r):  # the request ran entirely between two updates: that version
        if r["disconnected"] or r["finish"][0] not in ("stop", "length"):
            return None
        if any(not (r["ended"] < u["start"] or r["sent"] > u["end"]) for u in done_updates):
            return None
        v = sum(r["sent"] > u["end"] for u in done_updates)
        return v if set(r["versions"]) <= {v} else None

    clean = [i for i, r in enumerate(results) if clean_version(r) is not None]
    sample = sorted(rng.choice(clean, min(compare, len(clean)), replace=False).tolist())
    cfg = EngineConfig(**(engine_config or CONFIG))
    for i in sample:
        prompt, sp = requests[i]
        v = clean_version(results[i])
        alone = Engine(Model(model.config, params_of[v]), cfg).generate([prompt], sp)[0]
        got = np.frombuffer(results[i]["logprobs"], "<f4")
        assert alone.token_ids == results[i]["tokens"], (i, v)
        assert np.array_equal(alone.logprobs.view(np.uint32), got.view(np.uint32)), (i, v)
    tokens = sum(len(r["tokens"]) for r in results)
    return dict(
        requests=n, disconnected=sum(r["disconnected"] for r in results), finish_reasons=reasons,
        aborted_by_client=int(m["jengine_requests_aborted_by_client_total"]),
        updates=[f"{mode}->v{u['version']}" for (_, _, mode), u in zip(updates, done_updates)],
        pages_in_use_after=int(m["jengine_kv_pages_in_use"]), single_version=len(clean),
        compared=len(sample), bitwise_equal=len(sample), tokens=tokens,
        seconds=round(wall, 2), tokens_per_second=round(tokens / wall, 1),
        preemptions=int(m["jengine_preemptions_total"]),
    )  # fmt: skip


def throughput(url: str, model: Model, n: int, *, seed: int = 1,
               engine_config: dict | None = None) -> dict:  # fmt: skip
    """Tokens/s of the same workload (no disconnects, no updates) through the server at `url`
    and through `Engine.generate` in this process (compiled first: both run warm)."""
    rng = np.random.default_rng(seed)
    requests = make_requests(n, model.config.vocab_size, rng, max_tokens_hi=48)
    engine = Engine(model, EngineConfig(**(engine_config or CONFIG)))
    engine.warmup()
    engine.generate([p for p, _ in requests[:4]], [sp for _, sp in requests[:4]])  # top-n shapes
    t0 = time.perf_counter()
    outs = engine.generate([p for p, _ in requests], [sp for _, sp in requests])
    local = time.perf_counter() - t0
    local_tokens = sum(len(o.token_ids) for o in outs)
    out = dict(requests=n, engine_tokens=local_tokens, engine_seconds=round(local, 2),
               engine_tokens_per_second=round(local_tokens / local, 1))  # fmt: skip
    for stream in (True, False):
        bodies = [request_body(p, sp, stream) for p, sp in requests]
        asyncio.run(drive(url, bodies[:4], [None] * 4))  # the server warm too
        t0 = time.perf_counter()
        results, _ = asyncio.run(drive(url, bodies, [None] * n))
        served = time.perf_counter() - t0
        tokens = sum(len(r["tokens"]) for r in results)
        same = sum(r["tokens"] == o.token_ids and np.array_equal(
            np.frombuffer(r["logprobs"], "<f4").view(np.uint32), o.logprobs.view(np.uint32))
            for r, o in zip(results, outs))  # fmt: skip
        kind = "stream" if stream else "plain"
        out.update({f"{kind}_tokens": tokens, f"{kind}_bitwise_equal_requests": same,
                    f"{kind}_seconds": round(served, 2),
                    f"{kind}_tokens_per_second": round(tokens / served, 1),
                    f"{kind}_vs_engine": round(local / served, 3)})  # fmt: skip
    return out


def _start_server(port: int, weights_dir: str, config: dict) -> subprocess.Popen:
    flags = [f"--{k}={v}" for k, v in config.items()]
    proc = subprocess.Popen(
        [sys.executable, "-m", "jengine", "serve", "--model=tiny", f"--port={port}",
         f"--admin_key={ADMIN_KEY}", f"--weights_dir={weights_dir}", *flags],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 600
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start: {proc.stderr.read()[-3000:]}")
        time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=500, help="concurrent requests")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    model = load_model("tiny", seed=0)  # what `jengine serve --model=tiny` serves
    with tempfile.TemporaryDirectory() as weights_dir:
        proc = _start_server(args.port, weights_dir, CONFIG)
        url = f"http://127.0.0.1:{args.port}"
        try:
            speed = throughput(url, model, args.n)
            load = run_load(url, model, weights_dir, args.n, max_tokens_hi=48)
        finally:
            proc.terminate()
            rc = proc.wait(120)
        assert rc == 0, f"the server exited with {rc} on SIGTERM"
    result = dict(load=load, throughput=speed, server_exit_status=rc)
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
