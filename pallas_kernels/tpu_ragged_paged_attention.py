"""Ragged paged attention for Mosaic TPU: the generic kernel's math (`pallas_ragged_paged_attention`:
same programs, same KV blocks, same online-softmax step) with TPU memory handling.

page_table, seq_ids and positions are scalar-prefetched into SMEM; the pages stay in HBM
(`pl.ANY`) and each KV block is DMA'd page by page into a [KV_BLOCK, D] VMEM buffer per K and V.
Every DMA moves a plain [width, D] window (`.at[page, pl.ds(offset, width), kv_head, :]` into
`.at[pl.ds(row, width), :]`): no ref reshape or bitcast, which is what lets the kernel run under
`pltpu.force_tpu_interpret_mode()` on CPU (JAX's own ragged_paged_attention reshapes its DMA
buffer and fails there with "'ReshapeTransform' object has no attribute 'indices'").

One program per (token, kv head), as in the generic kernel, so the invariance argument is the
same.

SMEM: the whole page table is prefetched, so 4 * (max_seqs * pages_per_seq + 2 * T) bytes must
fit SMEM (1 MiB per core on v5e/v6e): 64 sequences of 131072 positions in pages of 16 do not
(`tpu_vmem`; cap max_model_len or max_num_seqs on TPU). Copies are synchronous (start all pages of a block, wait, compute): double-buffering the
next block is the first optimisation to make on hardware.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.pallas_common import TPU_INTERPRET, Interpret
from pallas_kernels.pallas_ragged_paged_attention import (
    absorb_block,
    block_range,
    finish,
    init_state,
    validate,
)
from pallas_kernels.ragged_paged_attention import KV_BLOCK


def kernel(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    seq_ids: jax.Array,
    positions: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    interpret: Interpret = False,
) -> jax.Array:
    """q[T, heads, D] -> [T, heads, D] in q's dtype; arguments as `ragged_paged_attention.reference`.

    `interpret`: False compiles for TPU; True or a `pltpu.InterpretParams` runs TPU interpret mode
    (True: `pallas_common.TPU_INTERPRET`, every check on), which simulates the DMAs and
    semaphores on CPU.
    """
    num_tokens, heads, head_dim = q.shape
    num_pages, page_size, kv_heads, _ = k_pages.shape
    group = validate(q, k_pages, v_pages, sliding_window)
    width = min(page_size, KV_BLOCK)
    pages_per_block = KV_BLOCK // width
    table = jnp.clip(page_table, 0, num_pages - 1).astype(jnp.int32)
    table = jnp.pad(table, ((0, 0), (0, -table.shape[1] % pages_per_block)))  # whole last block
    qg = q.reshape(num_tokens, kv_heads, group, head_dim)

    head_block = pl.BlockSpec((None, None, group, head_dim), lambda t, h, *_: (t, h, 0, 0))
    out = pl.pallas_call(
        functools.partial(
            _token_kernel,
            width=width,
            sm_scale=sm_scale,
            sliding_window=sliding_window,
            soft_cap=soft_cap,
        ),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(num_tokens, kv_heads),
            in_specs=[
                head_block,
                pl.BlockSpec(memory_space=pl.ANY),
                pl.BlockSpec(memory_space=pl.ANY),
            ],
            out_specs=head_block,
            scratch_shapes=[
                pltpu.VMEM((KV_BLOCK, head_dim), k_pages.dtype),
                pltpu.VMEM((KV_BLOCK, head_dim), v_pages.dtype),
                pltpu.SemaphoreType.DMA((2,)),
            ],
        ),
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=TPU_INTERPRET if interpret is True else interpret,
        name="tpu_ragged_paged_attention",
    )(table, seq_ids.astype(jnp.int32), positions.astype(jnp.int32), qg, k_pages, v_pages)
    return out.reshape(num_tokens, heads, head_dim)


def _token_kernel(
    table_ref,  # SMEM i32[max_seqs, pages_per_seq (padded to whole blocks)]
    seq_ids_ref,  # SMEM i32[T]
    positions_ref,  # SMEM i32[T]
    q_ref,  # VMEM [group, D]
    k_hbm,  # HBM [num_pages, page_size, kv_heads, D]
    v_hbm,  # HBM [num_pages, page_size, kv_heads, D]
    o_ref,  # VMEM [group, D]
    k_buf,  # VMEM [KV_BLOCK, D]
    v_buf,  # VMEM [KV_BLOCK, D]
    sems,  # DMA semaphores [2]: K, V
    *,
    width: int,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
) -> None:
    token, kv_head = pl.program_id(0), pl.program_id(1)
    seq = seq_ids_ref[token]
    pos = jnp.where(seq >= 0, positions_ref[token], -1)
    row = jnp.maximum(seq, 0)
    page_size = k_hbm.shape[1]
    q = q_ref[...].astype(jnp.float32)

    def fetch(block):
        copies = []
        for i in range(KV_BLOCK // width):
            key = block * KV_BLOCK + i * width
            src = (table_ref[row, key // page_size], pl.ds(key % page_size, width), kv_head)
            dst = pl.ds(i * width, width)
            copies.append(pltpu.make_async_copy(k_hbm.at[src], k_buf.at[dst], sems.at[0]))
            copies.append(pltpu.make_async_copy(v_hbm.at[src], v_buf.at[dst], sems.at[1]))
        for copy in copies:
            copy.start()
        for copy in copies:
            copy.wait()

    def step(block, state):
        fetch(block)
        return absorb_block(
            state, q, k_buf[...], v_buf[...], block, pos,
            sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
        )  # fmt: skip

    first, end = block_range(pos, sliding_window)
    state = jax.lax.fori_loop(first, end, step, init_state(*q.shape))
    o_ref[...] = finish(state).astype(o_ref.dtype)
