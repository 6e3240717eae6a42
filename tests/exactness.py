"""Rollout == `score` == `rl.token_logprobs`, bit for bit, on data the model generated itself.

The sweeps and the fuzzer (tests/test_exactness.py) share these helpers. Rows of random token ids
rarely expose a one-ulp difference; rows the model sampled do (their tokens sit where the
probability mass is), so every check here scores the engine's own rollouts:

- `rollout_pool` generates rows under several sampling settings (prompts of 1 token up, so every
  row length from 2 can be cut from them);
- `check_width` cuts a batch of rows to mixed lengths, the longest exactly `width`, and compares
  each completion token's rollout logprob with `jengine.score` and with `rl.token_logprobs` (called
  directly with per-row settings, or under the caller's `jax.jit` with every setting a Python
  constant: the two ways XLA sees the sampling rows).
"""

from __future__ import annotations

import dataclasses
import functools
import gc

import jax
import numpy as np

import jengine
from jengine import Engine, EngineConfig, Model, SamplingParams, rl
from jengine.runner import clear_compiled_steps

# Temperature alone (1 and below 1), top-k, top-p, min-p, and all together.
SETTINGS = (
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=0.9, top_k=40),
    SamplingParams(temperature=0.8, top_p=0.9),
    SamplingParams(temperature=1.0, min_p=0.05),
    SamplingParams(temperature=0.7, top_k=50, top_p=0.9, min_p=0.02),
)


@dataclasses.dataclass(frozen=True)
class Row:
    """One generated sequence: its prompt, sampled tokens and their rollout logprobs."""

    prompt: tuple[int, ...]
    completion: tuple[int, ...]
    logprobs: np.ndarray  # f32[len(completion)]
    params: SamplingParams

    @property
    def tokens(self) -> tuple[int, ...]:
        return self.prompt + self.completion


def bits(x) -> np.ndarray:
    return np.asarray(x, np.float32).view(np.uint32)


def rollout_pool(engine: Engine, *, length: int, prompt_lens=(1, 3, 7), seed: int = 0,
                 settings=SETTINGS) -> list[Row]:  # fmt: skip
    """One row per (setting, prompt length), each `length` tokens long (EOS ignored), generated
    in one `generate` call (so rows share steps with each other)."""
    vocab = engine.model.config.vocab_size
    rng = np.random.default_rng(seed)
    prompts, params = [], []
    for i, s in enumerate(settings):
        for p in prompt_lens:
            prompts.append(list(map(int, rng.integers(2, vocab, p))))
            params.append(dataclasses.replace(s, max_tokens=length - p, ignore_eos=True,
                                              seed=seed * 1000 + i * 10 + p))
    outs = engine.generate(prompts, params)
    return [Row(tuple(p), tuple(o.token_ids), np.asarray(o.logprobs, np.float32), s)
            for p, o, s in zip(prompts, outs, params)]  # fmt: skip


def batch_for(pool: list[Row], width: int, batch: int, offset: int = 0) -> list[tuple[Row, int]]:
    """`batch` (row, cut length) pairs: the first cut is exactly `width` tokens, the others shorter
    (mixed lengths); only rows whose prompt leaves at least one completion token are used."""
    chosen = []
    for j in range(len(pool)):
        row = pool[(offset + j) % len(pool)]
        n = max(width - 5 * len(chosen), len(row.prompt) + 1)
        if len(row.prompt) < n <= min(width, len(row.tokens)) and (chosen or n == width):
            chosen.append((row, n))
        if len(chosen) == batch:
            break
    assert chosen and chosen[0][1] == width, f"no row of the pool reaches {width} tokens"
    return chosen


def check_width(model: Model, numerics, pool: list[Row], width: int, *, batch: int,
                under_jit: bool, with_entropy: bool, offset: int = 0) -> list[str]:  # fmt: skip
    """Scores a batch whose longest row is `width` tokens three ways; returns the mismatches
    (empty when every completion token is bitwise the rollout's)."""
    cut = batch_for(pool, width, batch, offset)
    prompts = [list(r.prompt) for r, _ in cut]
    completions = [list(r.tokens[len(r.prompt) : n]) for r, n in cut]
    params = [r.params for r, _ in cut]
    b = rl.pack(prompts, completions, length=width)
    fn = functools.partial(rl.token_logprobs, config=model.config, sampling_params=params,
                           numerics=numerics, with_entropy=with_entropy)  # fmt: skip
    if under_jit:  # every setting and length a compile-time constant of the caller's program
        lens = (b["prompt_lens"].tolist(), b["completion_lens"].tolist())
        out = jax.jit(lambda p, t: fn(p, tokens=t, prompt_lens=lens[0], completion_lens=lens[1]))(
            model.params, b["tokens"])
    else:
        out = fn(model.params, tokens=b["tokens"], prompt_lens=b["prompt_lens"],
                 completion_lens=b["completion_lens"])  # fmt: skip
    values = np.asarray(out[0] if with_entropy else out)
    scored = jengine.score(model, prompts, completions, params, numerics=numerics)
    bad = []
    for j, ((row, n), p, c) in enumerate(zip(cut, prompts, completions)):
        want = bits(row.logprobs[: len(c)])
        trainer = bits(values[j, len(p) - 1 : len(p) - 1 + len(c)])
        for name, got in (("token_logprobs", trainer), ("score", bits(scored[j]))):
            if not np.array_equal(got, want):
                at = np.flatnonzero(got != want).tolist()
                bad.append(f"width {width} batch {len(cut)} row {j} (n={n}, prompt {len(p)}, "
                           f"{row.params}) jit={under_jit} entropy={with_entropy}: {name} differs "
                           f"at completion tokens {at}")  # fmt: skip
    return bad


def sweep(model: Model, numerics, pool: list[Row], widths) -> list[str]:
    """`check_width` at every width: batch sizes 1-5, under jit and (every fourth width, the
    slower path) called directly, entropy on and off."""
    bad = []
    for i, width in enumerate(widths):
        bad += check_width(model, numerics, pool, width, batch=1 + i % 5, under_jit=i % 4 != 1,
                           with_entropy=i % 3 == 0, offset=i)  # fmt: skip
        if i % 16 == 15:  # a program per width: drop them before XLA:CPU's memory maps run out
            jax.clear_caches()
            clear_compiled_steps()
            gc.collect()
    return bad


# A pool of 24 pages of 8 tokens (the preemption config of tests/test_engine.py: the same
# compiled steps): a request of up to SMALL_POOL_TOKENS tokens fits it, a few at once do not.
SMALL_POOL = dict(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64, num_pages=24,
                  page_size=8)  # fmt: skip
SMALL_POOL_TOKENS = 24 * 8


def engine_for(model: Model, length: int, tokenizer=None, **cfg) -> Engine:
    return Engine(model, EngineConfig(**{"max_model_len": length, "max_num_seqs": 32,
                                         "max_num_batched_tokens": 256, **cfg}),
                  tokenizer=tokenizer)  # fmt: skip


def trainer_bits_match(model: Model, numerics, trajectories) -> int:
    """Scores `rl.pack(trajectories)` with `rl.token_logprobs` (the loss mask as its mask);
    asserts every model token's value is its rollout logprob bit for bit and every other column
    0.0; returns the number of model tokens."""
    b = rl.pack(trajectories)
    values = rl.token_logprobs(model.params, model.config, b["tokens"], b["prompt_lens"],
                               b["completion_lens"], numerics=numerics, mask=b["loss_mask"],
                               sampling_params=[t.sampling_params for t in trajectories])
    values, mask = np.asarray(values), b["loss_mask"]
    assert np.array_equal(bits(values[mask]), bits(b["logprobs"][mask]))
    assert not values[~mask].any() and mask.sum() == sum(t.num_model_tokens for t in trajectories)
    return int(mask.sum())
