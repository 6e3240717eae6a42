"""Trainer-side scoring: the logprob of every completion token, teacher-forced.

`score` runs the engine's own compiled step (`runner.model_step`) over whole sequences written into
a scratch KV cache, and the same `sampling.select` with the completion tokens as targets. The
rollout's logprobs and these are therefore the same function of the same inputs: bitwise equal.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from jengine import sampling
from jengine.config import SamplingParams, check_numerics_settings
from jengine.models.transformer import Model, empty_kv_cache
from jengine.runner import StepInputs, model_step, next_pow2, pad_inputs
from pallas_kernels.ops import Numerics, default_backend

_SCRATCH_PAGE = 16


def _is_token_list(x) -> bool:
    return isinstance(x, (list, tuple, np.ndarray)) and all(
        isinstance(t, (int, np.integer)) for t in x
    )


def _validate_tokens(name: str, ids: Sequence[int], vocab: int, allow_empty: bool) -> None:
    if not _is_token_list(ids) or any(isinstance(t, (bool, np.bool_)) for t in ids):
        raise TypeError(f"{name} must be a list of ints, got {type(ids).__name__}")
    if not allow_empty and len(ids) == 0:
        raise ValueError(f"{name} is empty")
    bad = [int(t) for t in ids if not 0 <= int(t) < vocab]
    if bad:
        raise ValueError(f"{name} holds token ids {bad[:5]} outside [0, {vocab})")


def build_score_inputs(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    params: Sequence[SamplingParams],
    page_size: int = _SCRATCH_PAGE,
) -> tuple[StepInputs, int]:
    """One ragged step holding every (prompt + completion[:-1]) with pages laid out in order.

    Returns the inputs and the number of scratch pages they need.
    """
    tokens, positions, seq_ids, slots, rows_idx, tables = [], [], [], [], [], []
    seeds, targets, target_pos, row_sp = [], [], [], []
    next_page = 0
    pages_per_seq = max(-(-(len(p) + len(c)) // page_size) for p, c in zip(prompts, completions))
    for s, (prompt, completion, sp) in enumerate(zip(prompts, completions, params)):
        seq = list(prompt) + list(completion)
        n = len(seq) - 1 if completion else len(seq)
        num_pages = -(-len(seq) // page_size)
        table = np.arange(next_page, next_page + num_pages, dtype=np.int32)
        next_page += num_pages
        tables.append(np.pad(table, (0, pages_per_seq - num_pages)))
        base = len(tokens)
        for pos in range(n):
            tokens.append(seq[pos])
            positions.append(pos)
            seq_ids.append(s)
            slots.append(table[pos // page_size] * page_size + pos % page_size)
        for j, tok in enumerate(completion):
            pos = len(prompt) + j  # the target's position; its logits come from row pos - 1
            rows_idx.append(base + pos - 1)
            targets.append(int(tok))
            target_pos.append(pos)
            seeds.append(0)
            row_sp.append(sp)
    inputs = StepInputs(
        tokens=np.asarray(tokens, np.int32),
        positions=np.asarray(positions, np.int32),
        seq_ids=np.asarray(seq_ids, np.int32),
        slots=np.asarray(slots, np.int32),
        page_table=np.stack(tables).astype(np.int32),
        logit_rows=np.asarray(rows_idx, np.int32),
        rows=sampling.row_params(row_sp, seeds, target_pos, targets),
    )
    return inputs, next_page


def score(
    model: Model,
    prompt_token_ids,
    completion_token_ids,
    sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    *,
    logprobs_mode: str = "processed_logprobs",
    lm_head_dtype: str = "float32",
    numerics: str = "invariant",
    kernel_backend: str = "auto",
    column_blocks: int | None = None,
    mesh=None,
):
    """Each completion token's number under `logprobs_mode`, teacher-forced, in one forward pass.

    Args:
      model: the `Model` whose params to score with.
      prompt_token_ids: one prompt (list of ints) or a list of prompts.
      completion_token_ids: the matching completion(s); may be empty.
      sampling_params: the `SamplingParams` the tokens were (or would be) sampled with, one for
        all or one per sequence; None means temperature 1 with no filters.
      logprobs_mode: 'processed_logprobs' (default), 'raw_logprobs', 'processed_logits',
        'raw_logits' (vLLM's names).
      lm_head_dtype, numerics, kernel_backend: as in `EngineConfig`; match the engine's to get
        its bits.
      column_blocks: the tensor-parallel-invariant numerics setting (`EngineConfig.column_blocks`);
        pass the engine's `engine.numerics.column_blocks` to get its bits. None means the mesh's
        'model' size (1 without a mesh).
      mesh: optional ('data', 'model') `jax.sharding.Mesh`: params are sharded over 'model'
        (tensor parallel, `jengine.sharding`) and the sequences split over 'data'. Any mesh whose
        'model' size divides column_blocks gives the same bits as one device.
    Returns:
      f32[len(completion)] for one sequence, or a list of them for a batch. Tokens a filter
      dropped score -inf under the processed modes.
    """
    check_numerics_settings(logprobs_mode, lm_head_dtype, numerics)
    if not isinstance(model, Model):
        raise TypeError(f"model must be a jengine Model, got {type(model).__name__}")
    for name, ids in (("prompt_token_ids", prompt_token_ids), ("completion_token_ids", completion_token_ids)):
        if not isinstance(ids, (list, tuple, np.ndarray)) or not (
            _is_token_list(ids) or all(isinstance(x, (list, tuple, np.ndarray)) for x in ids)
        ):
            raise TypeError(
                f"{name} must be a list of ints (one sequence) or a list of such lists, got "
                f"{type(ids).__name__}"
            )
    single = _is_token_list(prompt_token_ids)
    prompts = [prompt_token_ids] if single else list(prompt_token_ids)
    completions = [completion_token_ids] if single else list(completion_token_ids)
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    vocab = model.config.vocab_size
    for i, (p, c) in enumerate(zip(prompts, completions)):
        _validate_tokens(f"prompt_token_ids[{i}]", p, vocab, allow_empty=False)
        _validate_tokens(f"completion_token_ids[{i}]", c, vocab, allow_empty=True)
        if len(p) + len(c) > model.config.max_position_embeddings:
            raise ValueError(
                f"sequence {i} has {len(p) + len(c)} tokens, more than "
                f"max_position_embeddings={model.config.max_position_embeddings}"
            )
    if sampling_params is None:
        sampling_params = SamplingParams()
    if isinstance(sampling_params, SamplingParams):
        per_seq = [sampling_params] * len(prompts)
    else:
        per_seq = list(sampling_params)
        if len(per_seq) != len(prompts) or not all(isinstance(s, SamplingParams) for s in per_seq):
            raise ValueError("sampling_params must be one SamplingParams or one per sequence")

    tp, groups = 1, [(None, list(range(len(prompts))))]
    if mesh is None:  # params already sharded (e.g. `engine.model` of a tensor-parallel engine)
        sharding_ = getattr(model.params["embed"], "sharding", None)
        if isinstance(sharding_, jax.sharding.NamedSharding) and sharding_.mesh.size > 1:
            mesh = sharding_.mesh
    if mesh is not None:
        from jengine import sharding

        mesh = sharding.normalize_mesh(mesh)
        dp, tp = sharding.mesh_sizes(mesh)
        subs = sharding.replica_meshes(mesh)
        groups = [(subs[g], list(range(g, len(prompts), dp))) for g in range(dp)]
        groups = [(m, idx) for m, idx in groups if idx]
    blocks = tp if column_blocks is None else column_blocks
    num = Numerics(mode=numerics, backend=default_backend(kernel_backend), column_blocks=blocks)
    if mesh is not None or blocks > 1:
        from jengine import sharding

        sharding.check_model(model.config, tp, blocks)
    # dispatch every data group's step before reading any (they run concurrently)
    pending = []
    for sub, idx in groups:
        pending.append(_score_group(
            model, sub, [prompts[i] for i in idx], [completions[i] for i in idx],
            [per_seq[i] for i in idx], num, lm_head_dtype, logprobs_mode,
        ))
    out: list = [None] * len(prompts)
    for (sub, idx), values in zip(groups, pending):
        values = np.asarray(jax.device_get(values))
        start = 0
        for i in idx:
            n = len(completions[i])
            out[i] = values[start : start + n].astype(np.float32)
            start += n
    return out[0] if single else out


def _score_group(model, mesh, prompts, completions, per_seq, num, lm_head_dtype, logprobs_mode):
    """Dispatches one scoring step (on `mesh`, a (1, tp) sub-mesh, or the default device);
    returns the device array of values."""
    params, parallel = model.params, None
    inputs, num_pages = build_score_inputs(prompts, completions, per_seq)
    if mesh is not None:
        from jengine import sharding

        params = sharding.shard_params(model.params, model.config, mesh)
        kv = sharding.empty_kv_cache(
            model.config, num_pages, _SCRATCH_PAGE, model.params["embed"].dtype, mesh
        )
        if sharding.mesh_sizes(mesh)[1] > 1:
            parallel = sharding.TensorParallel(mesh, num.column_blocks)
    else:
        kv = empty_kv_cache(model.config, num_pages, _SCRATCH_PAGE, model.params["embed"].dtype)
    num_tokens = next_pow2(len(inputs.tokens), 16)
    num_seqs = next_pow2(len(prompts))
    num_rows = next_pow2(len(inputs.logit_rows), 16)
    batch, rows = pad_inputs(inputs, num_tokens, num_seqs, num_pages * _SCRATCH_PAGE, num_rows)
    sel, _ = model_step(
        params,
        kv,
        batch,
        rows,
        config=model.config,
        numerics=num,
        lm_head_dtype=lm_head_dtype,
        logprobs_mode=logprobs_mode,
        top_n=0,
        parallel=parallel,
    )
    return sel.value
