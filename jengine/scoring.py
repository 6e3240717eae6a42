"""Trainer-side scoring: the logprob of every completion token, teacher-forced.

`score` builds a teacher-forcing `StepPlan` (`plan.teacher_forcing`: whole sequences written into
scratch KV pages, one logit row per completion token with that token as the target) and runs the
engine's own compiled step on it (`runner.run_plans`). The rollout's logprobs and these are
therefore the same function of the same inputs: bitwise equal under the same `Numerics`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jengine import plan as plan_lib
from jengine import sharding
from jengine.config import LOGPROBS_MODES, Numerics, SamplingParams, check_choice, resolve_numerics
from jengine.models.transformer import Model
from jengine.runner import empty_pages, next_pow2, place, run_plans

SCRATCH_PAGE = 16  # page size of the scratch KV pages; any page size gives the same bits


def _is_token_list(x) -> bool:
    return isinstance(x, (list, tuple, np.ndarray)) and all(
        isinstance(t, (int, np.integer)) and not isinstance(t, (bool, np.bool_)) for t in x
    )


def per_sequence(sampling_params, n: int) -> list[SamplingParams]:
    """One `SamplingParams` per sequence from None (temperature 1, no filters), one, or n."""
    if sampling_params is None:
        sampling_params = SamplingParams()
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * n
    per_seq = list(sampling_params)
    if len(per_seq) != n or not all(isinstance(s, SamplingParams) for s in per_seq):
        raise ValueError(f"sampling_params must be one SamplingParams or {n} of them")
    return per_seq


def layout(params, config, mesh, numerics) -> tuple[Any, int, Numerics]:
    """(mesh, its data size, numerics): `mesh` normalised, else the mesh the params are sharded on,
    else None (one device); `numerics` resolved for the mesh's 'model' size and the model checked
    against it."""
    if mesh is None:
        s = getattr(params["embed"], "sharding", None)
        if isinstance(s, jax.sharding.NamedSharding) and s.mesh.size > 1:
            mesh = s.mesh
    mesh = None if mesh is None else sharding.normalize_mesh(mesh)
    dp, tp = sharding.mesh_sizes(mesh) if mesh is not None else (1, 1)
    numerics = resolve_numerics(numerics, tp)
    if mesh is not None or numerics.column_blocks > 1:
        sharding.check_model(config, tp, numerics.column_blocks)
    return mesh, dp, numerics


def score(model: Model, prompt_token_ids, completion_token_ids,
          sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
          numerics: Numerics | None = None, logprobs_mode: str = "processed_logprobs", mesh=None):
    """Each completion token's number under `logprobs_mode`, teacher-forced, in one forward pass.

    Args:
      model: the `Model` whose params to score with.
      prompt_token_ids: one prompt (list of ints) or a list of prompts.
      completion_token_ids: the matching completion(s); may be empty.
      sampling_params: the `SamplingParams` the tokens were (or would be) sampled with, one for
        all or one per sequence; None means temperature 1 with no filters.
      numerics: a `jengine.Numerics`; pass `engine.numerics` to get the engine's bits. None means
        the defaults, with column_blocks = the mesh's 'model' size.
      logprobs_mode: 'processed_logprobs' (default), 'raw_logprobs', 'processed_logits',
        'raw_logits' (vLLM's names).
      mesh: optional ('data', 'model') `jax.sharding.Mesh`: params are sharded over 'model'
        (tensor parallel, `jengine.sharding`) and the sequences split round-robin over 'data'.
        Any mesh whose 'model' size divides column_blocks gives the same bits as one device.
        None: the mesh the params are already sharded on (e.g. `engine.model`), else one device.
    Returns:
      f32[len(completion)] for one sequence, or a list of them for a batch. Tokens a filter
      dropped score -inf under the processed modes.
    """
    check_choice("logprobs_mode", logprobs_mode, LOGPROBS_MODES)
    if not isinstance(model, Model):
        raise TypeError(f"model must be a jengine Model, got {type(model).__name__}")
    for name, ids in (("prompt_token_ids", prompt_token_ids),
                      ("completion_token_ids", completion_token_ids)):  # fmt: skip
        if not isinstance(ids, (list, tuple, np.ndarray)) or not (
            _is_token_list(ids) or all(isinstance(x, (list, tuple, np.ndarray)) for x in ids)
        ):
            raise TypeError(f"{name} must be a list of ints (one sequence) or a list of such "
                            f"lists, got {type(ids).__name__}")  # fmt: skip
    single = _is_token_list(prompt_token_ids)
    prompts = [prompt_token_ids] if single else list(prompt_token_ids)
    completions = [completion_token_ids] if single else list(completion_token_ids)
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    vocab, max_pos = model.config.vocab_size, model.config.max_position_embeddings
    for i, (p, c) in enumerate(zip(prompts, completions)):
        prompts[i] = p = plan_lib.check_token_ids(f"prompt_token_ids[{i}]", p, vocab)
        completions[i] = c = plan_lib.check_token_ids(f"completion_token_ids[{i}]", c, vocab, True)
        if len(p) + len(c) > max_pos:
            raise ValueError(f"sequence {i} has {len(p) + len(c)} tokens, more than "
                             f"max_position_embeddings={max_pos}")  # fmt: skip
    per_seq = per_sequence(sampling_params, len(prompts))
    mesh, dp, numerics = layout(model.params, model.config, mesh, numerics)
    groups = [list(range(g, len(prompts), dp)) for g in range(dp)]  # sequences of data row g
    # Page-table width and scratch pool in powers of two: programs repeat across calls, bits do not
    # change (attention walks a sequence's own blocks only, in logical order).
    longest = max(len(p) + len(c) for p, c in zip(prompts, completions))
    width = next_pow2(-(-longest // SCRATCH_PAGE))
    # per data row: (its plan, the scratch pages the plan writes)
    forced = [plan_lib.teacher_forcing([prompts[i] for i in idx], [completions[i] for i in idx],
                                       [per_seq[i] for i in idx], SCRATCH_PAGE, width)
              for idx in groups]  # fmt: skip
    plans = [p for p, _ in forced]
    shape = (next_pow2(max(p.num_tokens for p in plans), 16),
             next_pow2(max(len(idx) for idx in groups)),
             next_pow2(max(len(p.logit_rows) for p in plans), 16))  # fmt: skip
    num_pages = next_pow2(max([1] + [n for _, n in forced]))
    dtype = model.params["embed"].dtype
    sels, _ = run_plans(
        place(model, mesh), empty_pages(model.config, num_pages, SCRATCH_PAGE, dtype, mesh),
        plans, shape, num_pages * SCRATCH_PAGE, config=model.config, numerics=numerics,
        logprobs_mode=logprobs_mode, top_n=0, mesh=mesh,
    )  # fmt: skip
    out: list = [None] * len(prompts)
    for idx, sel in zip(groups, sels):
        start = 0
        for i in idx:
            n = len(completions[i])
            out[i] = sel.value[start : start + n].astype(np.float32)
            start += n
    return out[0] if single else out
