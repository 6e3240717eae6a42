"""`python -m jengine <command>`: demo (placeholder until the full CLI lands)."""

from __future__ import annotations

import sys


def demo() -> None:
    import time

    import numpy as np

    import jengine
    from jengine import EngineConfig, Model, ModelConfig, SamplingParams, init_params
    from jengine.engine import Engine

    cfg = ModelConfig.named("tiny")
    model = Model(cfg, init_params(cfg, 0))
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(2, cfg.vocab_size, n))) for n in (12, 30, 7, 21)]
    params = SamplingParams(temperature=1.0, max_tokens=24, seed=0)
    engine = Engine(model, EngineConfig(max_model_len=256))
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    seconds = time.perf_counter() - start
    equal = total = 0
    for o, p in zip(outs, prompts):
        s = jengine.score(model, p, o.token_ids, params)
        equal += int(np.sum(s.view(np.uint32) == o.logprobs.view(np.uint32)))
        total += len(s)
        print(f"{o.request_id}: {len(o.token_ids)} tokens, finish={o.finish_reason}, "
              f"logprobs[:4]={np.round(o.logprobs[:4], 3).tolist()}")
    print(f"{total} tokens in {seconds:.2f}s; parity: {equal}/{total} bitwise equal to jengine.score")


def run() -> None:
    args = sys.argv[1:]
    if args[:1] == ["demo"]:
        demo()
    else:
        print("usage: python -m jengine demo", file=sys.stderr)
        sys.exit(2)
