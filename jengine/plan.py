"""The step plan: one step of the model as plain numpy, what the host layer hands the device.

A plan is a flat, ragged batch. Token t belongs to page-table row `seq_ids[t]`, sits at position
`positions[t]` of its sequence (-1 marks padding) and writes its K/V to
`slots[t] = page * page_size + offset` (a slot past the pool writes nothing). A decoding sequence
brings one token, a prefilling one a chunk, a teacher-forced one its whole sequence: the device
runs the same function on all of them. `logit_rows` picks the tokens whose logits are needed, and
`rows` says, per logit row, how to sample (or which target to score).

Everything here is numpy and plain Python (no jax): the scheduler builds plans, scoring and the
RL scorer build the same type for teacher forcing (`teacher_forcing`), the device layer pads and
runs them, and `digest` makes a plan cheap to compare across processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import numpy as np

from jengine.config import SamplingParams

FILTERS = ("temperature", "top_k", "top_p", "min_p")  # the SamplingParams fields a row carries


@dataclasses.dataclass(frozen=True)
class SampleRows:
    """Per-logit-row sampling inputs, each [R].

    position: the position the sampled (or scored) token takes in its sequence: with `seed`, the
      counter of the row's sampling noise.
    target: the token whose value to return when `use_target` (teacher forcing).
    """

    temperature: np.ndarray  # f32; 0 = greedy
    top_k: np.ndarray  # i32; 0 = off
    top_p: np.ndarray  # f32; 1 = off
    min_p: np.ndarray  # f32; 0 = off
    seed: np.ndarray  # u32
    position: np.ndarray  # i32
    target: np.ndarray  # i32
    use_target: np.ndarray  # bool

    @classmethod
    def of(cls, params: Sequence[SamplingParams], seeds: Sequence[int], positions: Sequence[int],
           targets: Sequence[int | None] | None = None) -> SampleRows:  # fmt: skip
        """Rows from per-row sampling params, seeds, positions and (scoring) targets."""
        targets = [None] * len(params) if targets is None else targets
        columns = {k: [getattr(p, k) for p in params] for k in FILTERS}
        columns.update(seed=seeds, position=positions, target=[t or 0 for t in targets],
                       use_target=[t is not None for t in targets])  # fmt: skip
        n = len(params)
        return cls(**{k: np.asarray(v, ROW_DTYPES[k]).reshape(n) for k, v in columns.items()})


# Fill values that make a padding row inert: greedy, no filters, no target.
_ROW_FILL = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, position=0, target=0,
                 use_target=False)  # fmt: skip
ROW_DTYPES = dict(temperature=np.float32, top_k=np.int32, top_p=np.float32, min_p=np.float32,
                   seed=np.uint32, position=np.int32, target=np.int32, use_target=np.bool_)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """One step's inputs (shapes: T tokens, S page-table rows, R logit rows, P pages per row)."""

    tokens: np.ndarray  # i32[T] token ids (padding: 0)
    positions: np.ndarray  # i32[T] position in its sequence (padding: -1)
    seq_ids: np.ndarray  # i32[T] the token's row of page_table
    slots: np.ndarray  # i32[T] KV slot to write (padding: past the pool, writes nothing)
    page_table: np.ndarray  # i32[S, P] each sequence's pages in logical order
    logit_rows: np.ndarray  # i32[R] token indices whose logits are needed
    rows: SampleRows  # [R] how each logit row samples or scores

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def padded(self, num_tokens: int, num_seqs: int, num_rows: int, no_slot: int) -> StepPlan:
        """The plan grown to [num_tokens] tokens, [num_seqs] page-table rows and [num_rows] logit
        rows. Padding tokens sit at position -1 and write to `no_slot` (nowhere); padding logit
        rows are greedy rows of token 0, whose results are dropped."""

        def pad(a: np.ndarray, n: int, fill) -> np.ndarray:
            if a.shape[0] > n:
                raise ValueError(f"cannot pad {a.shape[0]} entries down to {n}")
            out = np.full((n,) + a.shape[1:], fill, a.dtype)
            out[: a.shape[0]] = a
            return out

        rows = SampleRows(**{f.name: pad(getattr(self.rows, f.name), num_rows, _ROW_FILL[f.name])
                             for f in dataclasses.fields(SampleRows)})  # fmt: skip
        return StepPlan(
            tokens=pad(self.tokens, num_tokens, 0), positions=pad(self.positions, num_tokens, -1),
            seq_ids=pad(self.seq_ids, num_tokens, 0), slots=pad(self.slots, num_tokens, no_slot),
            page_table=pad(self.page_table, num_seqs, 0),
            logit_rows=pad(self.logit_rows, num_rows, 0), rows=rows,
        )  # fmt: skip

    def digest(self) -> str:
        """A hex digest of every array (dtype, shape, bytes): equal plans, equal digests."""
        h = hashlib.blake2b(digest_size=16)
        arrays = [getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "rows"]
        arrays += [getattr(self.rows, f.name) for f in dataclasses.fields(SampleRows)]
        for a in arrays:
            a = np.ascontiguousarray(a)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
        return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class Row:
    """One logit row of a chunk: the logits of the chunk's token `offset` sample (or score
    `target`) the token at `position`, under `params` with noise seed `seed`."""

    offset: int
    params: SamplingParams
    seed: int
    position: int
    target: int | None = None


@dataclasses.dataclass(frozen=True)
class Chunk:
    """The tokens one sequence computes in a step: `tokens` at positions start, start + 1, ...,
    with the sequence's `pages` (logical order) and the logit rows it needs."""

    tokens: Sequence[int]
    start: int
    pages: Sequence[int]
    rows: Sequence[Row] = ()


def check_token_ids(name: str, ids, vocab: int, allow_empty: bool = False) -> list[int]:
    """`ids` as a list of ints, or a TypeError / ValueError naming `name` and the bad entry."""
    if isinstance(ids, np.ndarray):
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)):
        raise TypeError(f"{name} must be a list of ints, got {type(ids).__name__}")
    if not ids and not allow_empty:
        raise ValueError(f"{name} is empty")
    for t in ids:
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
            raise TypeError(f"{name} holds {t!r} ({type(t).__name__}), not an int")
        if not 0 <= t < vocab:
            raise ValueError(f"{name} holds token id {t}, outside [0, {vocab})")
    return [int(t) for t in ids]


def build(chunks: Sequence[Chunk], page_size: int, pages_per_seq: int) -> StepPlan:
    """The plan of `chunks`, sequence s being chunks[s] (unpadded)."""
    table = np.zeros((len(chunks), pages_per_seq), np.int32)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("tokens", "positions", "seq_ids", "slots")}
    logit_rows: list[int] = []
    rows: list[Row] = []
    base = 0
    for s, chunk in enumerate(chunks):
        pages = np.asarray(chunk.pages, np.int32)
        table[s, : len(pages)] = pages
        n = len(chunk.tokens)
        pos = np.arange(chunk.start, chunk.start + n, dtype=np.int32)
        parts["tokens"].append(np.asarray(chunk.tokens, np.int32).reshape(n))
        parts["positions"].append(pos)
        parts["seq_ids"].append(np.full(n, s, np.int32))
        parts["slots"].append(pages[pos // page_size] * page_size + pos % page_size)
        logit_rows += [base + r.offset for r in chunk.rows]
        rows += chunk.rows
        base += n
    flat = {k: np.concatenate(v) if v else np.zeros(0, np.int32) for k, v in parts.items()}
    sample_rows = SampleRows.of(
        [r.params for r in rows], [r.seed for r in rows], [r.position for r in rows],
        [r.target for r in rows],
    )  # fmt: skip
    return StepPlan(**{k: v.astype(np.int32) for k, v in flat.items()}, page_table=table,
                    logit_rows=np.asarray(logit_rows, np.int32), rows=sample_rows)  # fmt: skip


def teacher_forcing(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                    params: Sequence[SamplingParams], page_size: int,
                    pages_per_seq: int) -> tuple[StepPlan, int]:  # fmt: skip
    """One plan holding every prompt + completion[:-1], with consecutive scratch pages, and one
    logit row per completion token scoring it as the target (in sequence order).

    `pages_per_seq` must cover the longest prompt + completion. Returns (plan, number of
    scratch pages it writes).
    """
    chunks = []
    next_page = 0
    for prompt, completion, sp in zip(prompts, completions, params):
        seq = list(prompt) + list(completion)
        num_pages = -(-len(seq) // page_size)
        # the target at position p + j is scored by the logits of position p + j - 1
        p = len(prompt)
        rows = [Row(p - 1 + j, sp, 0, p + j, int(t)) for j, t in enumerate(completion)]
        n = len(seq) - 1 if completion else len(seq)
        chunks.append(Chunk(seq[:n], 0, range(next_page, next_page + num_pages), rows))
        next_page += num_pages
    return build(chunks, page_size, pages_per_seq), next_page
