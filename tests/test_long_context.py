"""Long sequences (5-6 KV blocks of 64 keys each) through everything that moves KV around at once.

One workload on the tiny model: prompts of 300+ tokens, most sharing a 256-token prefix (a GRPO
group among them), run with chunked prefill (64-token steps), prefix caching on and a KV pool
too small for all of them (preemption, recomputation). Every request's tokens and logprobs must
be bitwise those of the same request run alone (a large step budget, no prefix cache, nothing to
preempt, 64-token pages instead of 16) and bitwise `jengine.score` of its tokens. Short sequences never leave the first KV
block or two; here every query reads keys across 5 or more blocks, from pages that were computed
in other steps, by other requests (prefix hits), or recomputed after a preemption.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jengine
from jengine import Engine, EngineConfig, SamplingParams
from tests.test_semantics import VOCAB, write_llama

PREFIX = 256
MAX_TOKENS = 12
MAX_MODEL_LEN = 384
KV_BLOCK = 64


@pytest.fixture(scope="module")
def workload(tiny_model):
    rng = np.random.default_rng(11)
    vocab = tiny_model.config.vocab_size
    tokens = lambda n: list(map(int, rng.integers(2, vocab, n)))  # noqa: E731
    prefix = tokens(PREFIX)
    group = prefix + tokens(60)  # three samples of one prompt
    prompts = [group, group, group, prefix + tokens(70), prefix + tokens(52), tokens(318)]
    params = [
        SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, seed=1, ignore_eos=True),
        SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, seed=2, ignore_eos=True),
        SamplingParams(temperature=0.8, top_k=20, max_tokens=MAX_TOKENS, seed=3, ignore_eos=True),
        SamplingParams(temperature=0.9, top_p=0.9, max_tokens=MAX_TOKENS, seed=4, ignore_eos=True),
        SamplingParams(temperature=1.1, min_p=0.02, max_tokens=MAX_TOKENS, seed=5, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, seed=6, ignore_eos=True),
    ]
    assert all(len(p) + MAX_TOKENS >= 5 * KV_BLOCK for p in prompts)
    return prompts, params


def bits(x) -> np.ndarray:
    return np.asarray(x, np.float32).view(np.uint32)


def test_long_sequences_are_bitwise_alone_and_score(tiny_model, workload):
    """Chunked prefill + prefix-cache hits + preemption over 5+ KV blocks per sequence change no
    bit: every request equals itself run alone (no prefix cache, large budget, other pages) and
    `score`."""
    prompts, params = workload
    engine = Engine(tiny_model, EngineConfig(
        max_model_len=MAX_MODEL_LEN, page_size=16, num_pages=40, max_num_seqs=6,
        max_num_batched_tokens=64, enable_prefix_caching=True,
    ))  # fmt: skip
    outs = engine.generate(prompts, params)
    stats = engine.stats
    assert stats["prefix_cache_hit_tokens"] > 0, stats
    assert stats["preemptions"] > 0, stats
    assert stats["num_pages_free"] == stats["num_pages"], stats
    engine.check_invariants()

    alone_engine = Engine(tiny_model, EngineConfig(  # another page size too: 6 pages of 64
        max_model_len=MAX_MODEL_LEN, page_size=64, max_num_seqs=1, max_num_batched_tokens=512,
        enable_prefix_caching=False,
    ))  # fmt: skip
    assert alone_engine.numerics == engine.numerics
    for prompt, sp, out in zip(prompts, params, outs):
        assert len(out.token_ids) == MAX_TOKENS
        alone = alone_engine.generate([prompt], [sp])[0]
        assert out.token_ids == alone.token_ids, sp
        assert np.array_equal(bits(out.logprobs), bits(alone.logprobs)), sp
        scored = jengine.score(tiny_model, prompt, out.token_ids, sp, numerics=engine.numerics)
        assert np.array_equal(bits(scored), bits(out.logprobs)), sp
    assert alone_engine.stats["preemptions"] == 0
    assert outs[0].token_ids != outs[1].token_ids  # the group's samples differ (own seeds)


def test_long_sequences_match_transformers(tmp_path):
    """The same machinery against an independent reference: a random Llama written by
    transformers, long prompts (two sharing a 256-token prefix) generated with chunked prefill,
    prefix caching and preemption; every rollout logprob equals transformers' fp32
    log_softmax(logits / T) at that token within 1e-4. The bitwise test above cannot see a bug
    that every path shares (e.g. keys past some block never read); this one can."""
    hf_model = write_llama(str(tmp_path), seed=1, max_positions=512)
    model = jengine.load_model(str(tmp_path))
    rng = np.random.default_rng(12)
    prefix = list(map(int, rng.integers(3, VOCAB, PREFIX)))
    prompts = [prefix + list(map(int, rng.integers(3, VOCAB, n))) for n in (70, 90)]
    params = [SamplingParams(temperature=t, max_tokens=MAX_TOKENS, seed=i, ignore_eos=True)
              for i, t in enumerate((1.0, 0.7))]  # fmt: skip
    engine = Engine(model, EngineConfig(
        max_model_len=MAX_MODEL_LEN, page_size=16, num_pages=25, max_num_seqs=2,
        max_num_batched_tokens=64,
    ))  # fmt: skip
    outs = engine.generate(prompts, params)
    assert engine.stats["prefix_cache_hit_tokens"] > 0 and engine.stats["preemptions"] > 0
    for prompt, sp, out in zip(prompts, params, outs):
        with torch.no_grad():
            logits = hf_model(torch.tensor([prompt + out.token_ids])).logits[0].double()
        logits = logits[len(prompt) - 1 : -1] / sp.temperature
        want = torch.log_softmax(logits, -1)[torch.arange(MAX_TOKENS), torch.tensor(out.token_ids)]
        np.testing.assert_allclose(out.logprobs, want.numpy(), atol=1e-4, rtol=0)
