"""Prompts whose length is an exact multiple of the page size, fully in the prefix cache.

Such a prompt's pages could all be served from the cache, but its last token must still be
computed: the first sampled token is drawn from that token's logits. The prefix cache may cover at
most `len(prompt) - 1` tokens; covering the last one too (an off-by-one in the bound) leaves the
sequence with nothing to compute, and its first token is then read from another row's logits.

Identical prompts of k * page_size tokens (k = 1, 2, 3), several per `generate` (GRPO siblings: the
later ones wait one step and read the first one's pages) and again in later `generate` calls (the
freed pages keep their keys): every output is bitwise `jengine.score` of its tokens and bitwise
the output of an engine without prefix caching.
"""

from __future__ import annotations

import jengine
from jengine import Engine, EngineConfig, SamplingParams
from tests.conftest import random_prompts, same_bits

# test_engine.py's BASE with page_size=8, as in its prefix-cache tests (same compiled programs)
CONFIG = dict(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64, page_size=8)
PAGE = CONFIG["page_size"]
SIBLINGS = 3


def _params(seed: int) -> SamplingParams:
    return SamplingParams(temperature=0.8, top_k=50, max_tokens=3, seed=seed, ignore_eos=True)


def _calls(model) -> tuple[list[list[list[int]]], list[list[SamplingParams]]]:
    """Three `generate` calls' prompts and params: the k * PAGE-token prompts (k = 1, 2, 3), each
    SIBLINGS times in the first call, then twice, then once alone."""
    vocab = model.config.vocab_size
    prompts = [random_prompts(1, vocab, lo=k * PAGE, hi=k * PAGE + 1, seed=40 + k)[0]
               for k in (1, 2, 3)]  # fmt: skip
    assert [len(p) for p in prompts] == [PAGE, 2 * PAGE, 3 * PAGE]
    calls = [[p for p in prompts for _ in range(SIBLINGS)], [p for p in prompts for _ in range(2)],
             prompts[2:]]  # fmt: skip
    params, seed = [], 0
    for call in calls:
        params.append([_params(seed + i) for i in range(len(call))])
        seed += len(call)
    return calls, params


def _run(model, calls, params, **cfg):
    engine = Engine(model, EngineConfig(**CONFIG, **cfg))
    outs = [engine.generate(prompts, sps) for prompts, sps in zip(calls, params)]
    engine.check_invariants()
    assert engine.stats["num_pages_free"] == engine.stats["num_pages"], "pages leaked"
    return outs, engine


def test_fully_cached_page_multiple_prompts_are_exact(tiny_model):
    calls, params = _calls(tiny_model)
    cached, engine = _run(tiny_model, calls, params)
    cold, cold_engine = _run(tiny_model, calls, params, enable_prefix_caching=False)
    flat = [(p, sp, out, ref) for ps, sps, outs, refs in zip(calls, params, cached, cold)
            for p, sp, out, ref in zip(ps, sps, outs, refs)]  # fmt: skip
    scored = jengine.score(tiny_model, [p for p, *_ in flat], [o.token_ids for _, _, o, _ in flat],
                           [sp for _, sp, *_ in flat], numerics=engine.numerics)  # fmt: skip
    for i, ((prompt, sp, out, ref), want) in enumerate(zip(flat, scored)):
        assert len(out.token_ids) == sp.max_tokens, (i, out.finish_reason)
        assert same_bits(want, out.logprobs), (i, len(prompt), want, out.logprobs)
        assert out.token_ids == ref.token_ids, (i, len(prompt), out.token_ids, ref.token_ids)
        assert same_bits(out.logprobs, ref.logprobs), (i, len(prompt))
    # The cache served every full page but the last of each repeated prompt: in the first call
    # SIBLINGS - 1 siblings per prompt, then every request of the later calls. Never the last page.
    served = sum(len(p) - PAGE for p in calls[0][::SIBLINGS]) * (SIBLINGS - 1)
    served += sum(len(p) - PAGE for call in calls[1:] for p in call)
    assert engine.stats["prefix_cache_hit_tokens"] == served
    assert cold_engine.stats["prefix_cache_hit_tokens"] == 0
