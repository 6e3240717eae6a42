"""What a rollout's logprobs mean, end to end, against an independent reference.

A tiny random Llama is written by transformers and loaded with `jengine.load_model`. The engine
generates with top-k, top-p and min-p; every rollout logprob and every `jengine.score` of the same
tokens must equal the logprob of that token under the processed distribution computed from
transformers' fp32 logits by plain numpy (temperature -> min-p -> top-k -> top-p, vLLM V1's
order, renormalised; dropped tokens -inf), within 1e-4. Tokens the filters drop are scored too:
-inf on both sides.

The lm_head is scaled up so the distributions are peaked: then the filters keep a handful of
tokens, their order matters (top-p over the top-k survivors keeps fewer tokens than top-k over
the top-p survivors), and a wrong order or a wrong renormalisation moves the logprobs by far more
than the tolerance. Positions where the reference sits within `MARGIN` of a filter's threshold
(where fp32 rounding on either side could flip a token in or out) are left out of the comparison.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import jengine
from jengine import Engine, EngineConfig, SamplingParams
from tests.test_sampling import numpy_logprobs, numpy_processed

VOCAB = 256
TOL = 1e-4
MARGIN = 1e-4  # logits / probabilities this close to a filter's threshold are ambiguous
PARAMS = [
    SamplingParams(temperature=0.8, top_k=5, top_p=0.9, max_tokens=12, seed=1, ignore_eos=True),
    SamplingParams(temperature=1.2, min_p=0.1, top_p=0.8, max_tokens=12, seed=2, ignore_eos=True),
    SamplingParams(top_k=3, max_tokens=12, seed=3, ignore_eos=True),
    SamplingParams(
        temperature=0.9, min_p=0.05, top_k=8, top_p=0.7, max_tokens=12, seed=4, ignore_eos=True
    ),
]
PROMPTS_PER_PARAMS = 2


def write_llama(directory, seed: int = 0, max_positions: int = 256) -> torch.nn.Module:
    """A seeded random fp32 Llama (vocab 256, hidden 64, 2 layers, GQA 4/2) saved by transformers,
    with a large lm_head (peaked next-token distributions)."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        rms_norm_eps=1e-6, tie_word_embeddings=False, dtype="float32",
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if name == "lm_head.weight" else 0.05
            noise = torch.randn_like(p)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else scale * noise)
    model.eval()
    model.save_pretrained(directory)
    return model


def hf_logits(model, prompt: list[int], completion: list[int]) -> np.ndarray:
    """transformers' fp32 logits f32[len(completion), vocab] predicting each completion token."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].float()
    return logits[len(prompt) - 1 : len(prompt) + len(completion) - 1].numpy()


def near_a_threshold(raw: np.ndarray, sp: SamplingParams) -> bool:
    """Whether some token's fate under `sp` is decided within MARGIN of a filter's threshold."""
    z = raw.astype(np.float64) / sp.temperature

    def softmax(v):
        e = np.where(np.isfinite(v), np.exp(v - np.max(v[np.isfinite(v)])), 0.0)
        return e / e.sum()

    p = softmax(z)
    if sp.min_p > 0:
        if np.any(np.abs(p - sp.min_p * p.max()) < MARGIN * p.max()):
            return True
        z = np.where(p >= sp.min_p * p.max(), z, -np.inf)
    if sp.top_k:
        live = np.sort(z[np.isfinite(z)])[::-1]
        if sp.top_k < len(live) and live[sp.top_k - 1] - live[sp.top_k] < MARGIN:
            return True
        if sp.top_k < len(live):
            z = np.where(z >= live[sp.top_k - 1], z, -np.inf)
    if sp.top_p < 1:
        p = softmax(z)
        order = np.argsort(-p, kind="stable")
        above = np.cumsum(p[order]) - p[order]
        if np.any(np.abs(above[p[order] > 0] - sp.top_p) < MARGIN):
            return True
    return False


def reference_logprobs(raw: np.ndarray, sp: SamplingParams, tokens: list[int]) -> np.ndarray:
    """Per row of raw[n, vocab]: the logprob of tokens[row] under the processed distribution."""
    return np.array([numpy_logprobs(numpy_processed(r, sp))[t] for r, t in zip(raw, tokens)])


def assert_matches_reference(got, want, ambiguous, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    clear = ~ambiguous
    assert np.array_equal(np.isneginf(got[clear]), np.isneginf(want[clear])), (what, got, want)
    finite = clear & np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], atol=TOL, rtol=0, err_msg=what)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    hf_model = write_llama(str(directory))
    return jengine.load_model(str(directory)), hf_model


def test_rollout_and_score_follow_the_processed_distribution(llama):
    """Rollout logprobs and `jengine.score` (with the engine's numerics) are the logprobs of the
    sampled tokens under transformers' logits pushed through the numpy processed distribution;
    tokens the filters drop score -inf on both sides; rollout and score agree bitwise."""
    model, hf_model = llama
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(3, VOCAB, int(rng.integers(4, 12)))))
               for _ in range(len(PARAMS) * PROMPTS_PER_PARAMS)]  # fmt: skip
    params = [sp for sp in PARAMS for _ in range(PROMPTS_PER_PARAMS)]
    config = EngineConfig(max_model_len=64, max_num_seqs=8, max_num_batched_tokens=64)
    engine = Engine(model, config)
    outs = engine.generate(prompts, params)
    checked = total = dropped_checked = 0
    for prompt, sp, out in zip(prompts, params, outs):
        tokens = out.token_ids
        assert len(tokens) == sp.max_tokens
        raw = hf_logits(hf_model, prompt, tokens)
        ambiguous = np.array([near_a_threshold(r, sp) for r in raw])
        want = reference_logprobs(raw, sp, tokens)
        assert np.all(np.isfinite(want[~ambiguous])), "the engine sampled a token the filters drop"
        scored = jengine.score(model, prompt, tokens, sp, numerics=engine.numerics)
        assert np.array_equal(scored.view(np.uint32), out.logprobs.view(np.uint32))
        assert_matches_reference(out.logprobs, want, ambiguous, f"rollout {sp}")
        assert_matches_reference(scored, want, ambiguous, f"score {sp}")
        checked += int(np.sum(~ambiguous))
        total += len(tokens)
        # teacher-force, at every third position, the least likely token instead: every filter
        # here drops it, so its logprob is -inf (and the tokens before it are unchanged)
        for j in range(0, len(tokens), 3):
            if ambiguous[j]:
                continue
            worst = int(np.argmin(raw[j]))
            forced = tokens[:j] + [worst]
            want_forced = reference_logprobs(raw[: j + 1], sp, forced)
            assert np.isneginf(want_forced[-1])
            got = jengine.score(model, prompt, forced, sp, numerics=engine.numerics)
            assert np.isneginf(got[-1]), (sp, j, got[-1])
            assert np.array_equal(got[:-1].view(np.uint32), out.logprobs[:j].view(np.uint32))
            dropped_checked += 1
    assert checked >= 0.9 * total, (checked, total)
    assert dropped_checked >= len(outs) * 3
