"""The kernel calls of one engine step at real model shapes, as abstract arguments (no weights):
Qwen3-0.6B, Llama-3.2-1B (from configs/) and Gemma-3-270M (hidden 640, 4 heads over 1 KV head of
256, vocab 262144, intermediate 2048, qk-norm, sliding window 512 on local layers).

The engine-side sizes are the defaults of `EngineConfig`: a 512-token step (the largest bucket of
max_num_batched_tokens=512), 64 sequences, pages of 16, page tables as long as the model's
max_position_embeddings (max_model_len=None)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jengine import ModelConfig
from jengine.config import Numerics
from pallas_kernels import ops

S = jax.ShapeDtypeStruct


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    qk_norm: bool
    max_positions: int
    sliding_window: int | None = None  # local layers' window (their global layers have none)

    @classmethod
    def of(cls, name: str) -> Shape:
        c = ModelConfig.named(name)
        return cls(
            c.hidden_size,
            c.intermediate_size,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim,
            c.vocab_size,
            c.qk_norm,
            c.max_position_embeddings,
        )


MODELS = ("qwen3-0.6b", "llama-3.2-1b", "gemma-3-270m")
GEMMA3_270M = Shape(640, 2048, 4, 1, 256, 262144, True, 32768, sliding_window=512)


def shape(name: str) -> Shape:
    return GEMMA3_270M if name == "gemma-3-270m" else Shape.of(name)


def step_calls(
    s: Shape, backend: str = "pallas", *, tokens: int = 512, seqs: int = 64, page_size: int = 16
) -> dict[str, tuple[Callable, tuple]]:
    """{call name: (fn, abstract args)} for every distinct kernel call of one step (bf16 model,
    fp32 lm_head over `seqs` logit rows)."""
    num = Numerics(backend=backend)
    bf16, f32, i32 = jnp.bfloat16, jnp.float32, jnp.int32
    h, q_out, kv_out = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim
    pages_per_seq = -(-s.max_positions // page_size)
    kv = S((seqs * pages_per_seq, page_size, s.kv_heads, s.head_dim), bf16)
    meta = S((seqs, pages_per_seq), i32), S((tokens,), i32), S((tokens,), i32)
    matmul = lambda x, w: ops.matmul(x, w, num)  # noqa: E731
    norm = lambda x, w: ops.rms_norm(x, w, 1e-6, num)  # noqa: E731
    calls = {
        "rms_norm": (norm, (S((tokens, h), bf16), S((h,), bf16))),
        "matmul q": (matmul, (S((tokens, h), bf16), S((q_out, h), bf16))),
        "matmul k/v": (matmul, (S((tokens, h), bf16), S((kv_out, h), bf16))),
        "matmul o": (matmul, (S((tokens, q_out), bf16), S((h, q_out), bf16))),
        "matmul gate/up": (matmul, (S((tokens, h), bf16), S((s.intermediate, h), bf16))),
        "matmul down": (matmul, (S((tokens, s.intermediate), bf16), S((h, s.intermediate), bf16))),
        "lm_head (fp32)": (matmul, (S((seqs, h), f32), S((s.vocab, h), f32))),
    }
    if s.qk_norm:
        calls["rms_norm q/k heads"] = (
            norm,
            (S((tokens, s.heads, s.head_dim), bf16), S((s.head_dim,), bf16)),
        )
    windows = [None] + ([s.sliding_window] if s.sliding_window else [])
    for window in windows:
        attend = functools.partial(
            ops.attention, numerics=num, sm_scale=s.head_dim**-0.5, sliding_window=window
        )
        name = "attention" + (f" (window {window})" if window else "")
        calls[name] = (attend, (S((tokens, s.heads, s.head_dim), bf16), kv, kv, *meta))
    return calls
