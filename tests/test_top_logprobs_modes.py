"""`top_logprobs` follow the engine's `logprobs_mode`, at temperature != 1 with top-k and top-p.

Under every mode the n best (id, value) pairs of a token are the n best entries of the same
distribution its `logprob` comes from (jengine/sampling.py's module docstring):

  raw_logits          raw logits l
  raw_logprobs        log_softmax(l)
  processed_logits    z = l / T, -inf where min-p / top-k / top-p dropped the token
  processed_logprobs  log_softmax(z) over the survivors

Requests sample at T != 1 with top-k and/or top-p, so the four distributions differ. For each
generated token the reference is plain numpy on the raw logits of the teacher-forced sequence (the
model's `forward` over `score`'s teacher-forcing plan; the sampled tokens' entries are checked
against `jengine.score(..., logprobs_mode="raw_logits")` bit for bit): the mode's values in f32,
ranked best first (ties: lower id first, as `lax.top_k`), compared bit for bit (z as l / T or
as l times the f32 reciprocal of T, the form XLA compiles the division to). For the logprob
modes the per-row normaliser is not recomputed bitwise in numpy: the check asks for one f32
constant c, within a few ulps of the float64 log-sum-exp, such that every one of the n values and
the token's logprob are `source - c` exactly. And the sampled token's own entry, when it is among
the n, is its `logprob` bit for bit.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

import jengine
from jengine import Engine, EngineConfig, SamplingParams
from jengine import plan as plan_lib
from jengine.config import LOGPROBS_MODES
from jengine.models.transformer import empty_kv_cache, forward
from jengine.runner import next_pow2
from tests.conftest import random_prompts, same_bits
from tests.test_sampling import numpy_processed

BASE = dict(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64)  # test_engine.py's
PARAMS = [
    SamplingParams(temperature=0.7, top_k=5, max_tokens=4, seed=11, logprobs=8, ignore_eos=True),
    SamplingParams(temperature=1.3, top_p=0.8, max_tokens=4, seed=12, logprobs=8, ignore_eos=True),
    SamplingParams(temperature=0.6, top_k=12, top_p=0.9, max_tokens=4, seed=13, logprobs=20,
                   ignore_eos=True),  # fmt: skip
]
ULPS = 16  # how far from the float64 log-sum-exp the engine's f32 normaliser may be


@functools.partial(jax.jit, static_argnames=("config", "numerics"))
def _logits(params, plan, kv, *, config, numerics):
    return forward(params, config, plan, kv, numerics)[0]


def raw_logits(model, prompt, completion, numerics) -> np.ndarray:
    """f32[len(completion), vocab]: the raw logits predicting each completion token, from the
    model's forward over the teacher-forcing plan `jengine.score` runs."""
    page = 16
    pages = -(-(len(prompt) + len(completion)) // page)
    plan, used = plan_lib.teacher_forcing([prompt], [completion], [SamplingParams()], page,
                                          next_pow2(pages))  # fmt: skip
    num_pages = next_pow2(used)
    padded = plan.padded(next_pow2(plan.num_tokens, 16), 1, next_pow2(len(plan.logit_rows), 16),
                         num_pages * page)  # fmt: skip
    kv = empty_kv_cache(model.config, num_pages, page, model.params["embed"].dtype)
    out = _logits(model.params, padded, kv, config=model.config, numerics=numerics)
    return np.asarray(out, np.float32)[: len(completion)]


def mode_sources(raw: np.ndarray, sp: SamplingParams, mode: str) -> list[np.ndarray]:
    """f32[V] values the mode's distribution is built on: the raw logits, or the processed logits
    z = raw / T in f32 with the dropped tokens at -inf. XLA computes the division by the row's
    temperature as a multiplication by its f32 reciprocal (its algebraic simplifier rewrites a
    division by a broadcast scalar), which can differ from raw / T in the last bit: both forms
    are returned, and a row must match one of them throughout."""
    raw = raw.astype(np.float32)
    if mode.startswith("raw"):
        return [raw]
    kept = np.isfinite(numpy_processed(raw, sp))  # which tokens survive: float64 reference
    t = np.float32(sp.temperature)
    return [np.where(kept, z, np.float32(-np.inf)).astype(np.float32)
            for z in (raw * (np.float32(1) / t), raw / t)]  # fmt: skip


def ranked(values: np.ndarray, n: int) -> np.ndarray:
    """Ids of the n largest entries of f32 values, best first, ties by lower id (`lax.top_k`)."""
    return np.lexsort((np.arange(values.size), -values.astype(np.float64)))[:n]


def _normalisers(source: np.ndarray):
    """f32 candidates for the log-sum-exp of `source`'s finite entries, nearest first."""
    finite = source[np.isfinite(source)].astype(np.float64)
    c0 = np.float32(np.log(np.sum(np.exp(finite - finite.max()))) + finite.max())
    up, down = [c0], [c0]
    for _ in range(ULPS):
        up.append(np.nextafter(up[-1], np.float32(np.inf)))
        down.append(np.nextafter(down[-1], np.float32(-np.inf)))
    return [c0] + [c for pair in zip(up[1:], down[1:]) for c in pair]


def expected_tops(source: np.ndarray, mode: str, token: int, n: int):
    """The (ids, f32 values, the token's value) the mode's top-n may be: one triple for the logit
    modes; for the logprob modes one per candidate normaliser c (values `source - c` in f32)."""
    if mode.endswith("logits"):
        ids = ranked(source, n)
        return [(ids, source[ids], source[token])]
    out = []
    for c in _normalisers(source):
        values = (source - c).astype(np.float32)  # f32 subtraction, -inf stays -inf
        ids = ranked(values, n)
        out.append((ids, values[ids], values[token]))
    return out


@pytest.mark.parametrize("mode", LOGPROBS_MODES)
def test_top_logprobs_are_the_modes_own_top_n(tiny_model, mode):
    prompts = random_prompts(len(PARAMS), tiny_model.config.vocab_size, lo=4, hi=5, seed=21)
    engine = Engine(tiny_model, EngineConfig(**BASE, logprobs_mode=mode))
    outs = engine.generate(prompts, PARAMS)
    engine.check_invariants()
    sampled_in_top = 0
    # the raw logits the reference starts from are the scorer's: at the sampled tokens, bitwise
    scored_raw = jengine.score(tiny_model, prompts, [o.token_ids for o in outs], PARAMS,
                               numerics=engine.numerics, logprobs_mode="raw_logits")  # fmt: skip
    for prompt, sp, out, want_raw in zip(prompts, PARAMS, outs, scored_raw):
        assert len(out.token_ids) == sp.max_tokens and len(out.top_logprobs) == sp.max_tokens
        raw = raw_logits(tiny_model, prompt, out.token_ids, engine.numerics)
        assert same_bits(raw[np.arange(len(out.token_ids)), out.token_ids], want_raw)
        for j, (tok, lp, top) in enumerate(zip(out.token_ids, out.logprobs, out.top_logprobs)):
            where = (sp, j, tok)
            assert len(top) == sp.logprobs, where
            ids = np.array([i for i, _ in top])
            values = np.array([v for _, v in top], np.float32)
            # the sampled token's entry, when it is among the n, is its logprob bit for bit
            if tok in ids.tolist():
                sampled_in_top += 1
                assert same_bits(values[ids.tolist().index(tok)], lp), (where, top, lp)
            # the n best of the mode's own distribution, plain numpy
            wants = [w for source in mode_sources(raw[j], sp, mode)
                     for w in expected_tops(source, mode, tok, sp.logprobs)]  # fmt: skip
            got = (ids.tolist(), values.view(np.uint32).tolist(), np.float32(lp).view(np.uint32))
            matches = [w for w in wants if got == (w[0].tolist(), w[1].view(np.uint32).tolist(),
                                                    np.float32(w[2]).view(np.uint32))]
            assert matches, (where, list(zip(ids, values)), lp, "want (first candidate)",
                             list(zip(wants[0][0], wants[0][1])), wants[0][2])
    # two requests keep top_k <= n tokens: their 2 x 4 sampled tokens are always among the n
    assert sampled_in_top >= 2 * 4, sampled_in_top
