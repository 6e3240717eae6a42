"""The compiled step and the bucket table.

`model_step` is the one jitted function behind both the engine and `jengine.score`: forward over a
ragged batch of tokens, then `sampling.select` over the logit rows. Shapes are bucketed (token
count to a power of two, sequence rows with it), so the number of compilations is bounded by the
bucket table; the KV cache is donated and updated in place.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jengine import sampling
from jengine.config import ModelConfig
from jengine.models.transformer import Batch, KVCache, Params, forward
from pallas_kernels.ops import Numerics

MIN_TOKEN_BUCKET = 16


@functools.partial(
    jax.jit,
    static_argnames=("config", "numerics", "lm_head_dtype", "logprobs_mode", "top_n", "parallel"),
    donate_argnames=("kv",),
)
def model_step(
    params: Params,
    kv: KVCache,
    batch: Batch,
    rows: sampling.RowParams,
    *,
    config: ModelConfig,
    numerics: Numerics,
    lm_head_dtype: str,
    logprobs_mode: str,
    top_n: int,
    parallel: Any = None,
) -> tuple[sampling.Selected, KVCache]:
    """One step: write this step's K/V, compute logits of `batch.logit_rows`, select tokens.

    `parallel`: None (one device, or params committed to one device), or a
    `jengine.sharding.TensorParallel`: the same step under shard_map over its mesh's 'model' axis.
    """
    if parallel is not None:
        from jengine.sharding import sharded_step

        return sharded_step(
            parallel, params, kv, batch, rows, config=config, numerics=numerics,
            lm_head_dtype=lm_head_dtype, logprobs_mode=logprobs_mode, top_n=top_n,
        )
    logits, kv = forward(params, config, batch, kv, numerics, lm_head_dtype)
    return sampling.select(logits, rows, logprobs_mode, top_n), kv


def next_pow2(n: int, lo: int = 1) -> int:
    return max(lo, 1 << max(0, (n - 1).bit_length()))


@dataclasses.dataclass
class StepInputs:
    """A step's logical content (numpy, unpadded); the runner pads it to its bucket.

    tokens/positions/seq_ids/slots: [T]; page_table: [S, pages_per_seq]; logit_rows: [R] indices
    into the T tokens; rows: per-logit-row sampling inputs with R entries.
    """

    tokens: np.ndarray
    positions: np.ndarray
    seq_ids: np.ndarray
    slots: np.ndarray
    page_table: np.ndarray
    logit_rows: np.ndarray
    rows: sampling.RowParams


# Fill values that make a padded logit row inert (greedy, no filters, no target).
_ROW_FILL = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, position=0, target=0,
                 use_target=False)


def pad_inputs(
    inputs: StepInputs, num_tokens: int, num_seqs: int, no_slot: int, num_rows: int | None = None
) -> tuple[Batch, sampling.RowParams]:
    """Pads to [num_tokens] token rows, [num_seqs] page-table rows and [num_rows] logit rows
    (default num_seqs). Padding tokens sit at position -1 and write to `no_slot` (nothing)."""
    num_rows = num_rows or num_seqs

    def pad(a: np.ndarray, n: int, fill: Any) -> np.ndarray:
        out = np.full((n,) + a.shape[1:], fill, a.dtype)
        out[: a.shape[0]] = a
        return out

    batch = Batch(
        tokens=pad(inputs.tokens.astype(np.int32), num_tokens, 0),
        positions=pad(inputs.positions.astype(np.int32), num_tokens, -1),
        seq_ids=pad(inputs.seq_ids.astype(np.int32), num_tokens, 0),
        slots=pad(inputs.slots.astype(np.int32), num_tokens, no_slot),
        page_table=pad(inputs.page_table.astype(np.int32), num_seqs, 0),
        logit_rows=pad(inputs.logit_rows.astype(np.int32), num_rows, 0),
    )
    r = inputs.rows
    rows = sampling.RowParams(
        **{
            f.name: pad(np.asarray(getattr(r, f.name)), num_rows, _ROW_FILL[f.name])
            for f in dataclasses.fields(r)
        }
    )
    return batch, rows


class Runner:
    """Owns the device KV cache and calls `model_step` at bucketed shapes.

    Token buckets: powers of two from MIN_TOKEN_BUCKET up to `max_tokens`; the sequence/logit-row
    bucket is min(token bucket, next_pow2(max_seqs)). `top_n` is 0 or `max_top_n` (20), so the
    table has at most 2 x len(token_buckets) entries.
    """

    MAX_TOP_N = 20

    def __init__(
        self,
        model_config: ModelConfig,
        params: Params,
        kv: KVCache,
        *,
        numerics: Numerics,
        lm_head_dtype: str,
        logprobs_mode: str,
        max_tokens: int,
        max_seqs: int,
        parallel: Any = None,
    ):
        self.parallel = parallel  # jengine.sharding.TensorParallel or None
        self.config = model_config
        self.params = params
        self.kv = kv
        self.numerics = numerics
        self.lm_head_dtype = lm_head_dtype
        self.logprobs_mode = logprobs_mode
        self.token_buckets = []
        b = MIN_TOKEN_BUCKET
        while True:
            self.token_buckets.append(b)
            if b >= max_tokens:
                break
            b *= 2
        self.max_seq_bucket = next_pow2(max_seqs)
        self.no_slot = kv[0][0].shape[0] * kv[0][0].shape[1]
        self.compiled: set[tuple[int, int, int]] = set()
        self.compile_seconds = 0.0

    @property
    def bucket_table_size(self) -> int:
        return 2 * len(self.token_buckets)

    def bucket(self, num_tokens: int) -> tuple[int, int]:
        for t in self.token_buckets:
            if t >= num_tokens:
                return t, min(t, self.max_seq_bucket)
        raise ValueError(f"{num_tokens=} exceeds the largest token bucket {self.token_buckets[-1]}")

    def run(
        self, inputs: StepInputs, top_n: int = 0, min_tokens: int = 0
    ) -> tuple[sampling.Selected, bool, float]:
        """Runs one step. Returns (numpy Selected with R rows, compiled_now, seconds).

        `min_tokens` forces a bucket at least that large (warm-up).
        """
        top_n = self.MAX_TOP_N if top_n else 0
        num_tokens, num_seqs = self.bucket(max(len(inputs.tokens), min_tokens))
        batch, rows = pad_inputs(inputs, num_tokens, num_seqs, self.no_slot)
        key = (num_tokens, num_seqs, top_n)
        start = time.perf_counter()
        sel, self.kv = model_step(
            self.params,
            self.kv,
            batch,
            rows,
            config=self.config,
            numerics=self.numerics,
            lm_head_dtype=self.lm_head_dtype,
            logprobs_mode=self.logprobs_mode,
            top_n=top_n,
            parallel=self.parallel,
        )
        sel = jax.tree_util.tree_map(np.asarray, sel)
        seconds = time.perf_counter() - start
        compiled_now = key not in self.compiled
        if compiled_now:
            self.compiled.add(key)
            self.compile_seconds += seconds
        r = len(inputs.logit_rows)
        return jax.tree_util.tree_map(lambda a: a[:r], sel), compiled_now, seconds

    def warmup(self, pages_per_seq: int, with_top_n: bool = False) -> int:
        """Compiles every bucket with all-padding inputs (they write nothing). Returns how many."""
        empty = StepInputs(
            tokens=np.zeros((0,), np.int32),
            positions=np.zeros((0,), np.int32),
            seq_ids=np.zeros((0,), np.int32),
            slots=np.zeros((0,), np.int32),
            page_table=np.zeros((0, pages_per_seq), np.int32),
            logit_rows=np.zeros((0,), np.int32),
            rows=sampling.row_params([], [], []),
        )
        before = len(self.compiled)
        for t in self.token_buckets:
            for top_n in (0, 1) if with_top_n else (0,):
                self.run(empty, top_n=top_n, min_tokens=t)
        return len(self.compiled) - before
