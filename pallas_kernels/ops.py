"""The one door the model uses: `ops.matmul`, `ops.rms_norm`, `ops.attention` (and
`ops.write_kv`), `ops.route` and `ops.experts` (mixture-of-experts), each taking a resolved
`jengine.config.Numerics` that says which lowering to run.

* `Numerics(mode="invariant", backend="cpu")`: fixed-tile plain JAX (fast on CPU, batch-invariant).
* `Numerics(mode="invariant", backend="pallas")`: the Pallas kernels (`pallas_<op>.py`: Triton on
  GPU, Mosaic on TPU, where attention uses `tpu_ragged_paged_attention`), chosen by the platform
  the step is lowered for (`pallas_common.by_platform`), so one traced step exports to both;
  `backend="pallas_interpret"` runs the generic kernels in the HLO interpreter (tests on CPU);
  `backend="tpu_interpret"` runs the Mosaic TPU kernels (attention: `tpu_ragged_paged_attention`)
  under Pallas' TPU interpreter with race detection, out-of-bounds checks and NaN-filled
  uninitialised memory (`pallas_common.TPU_INTERPRET`): slow, for tests on CPU.
* `Numerics(mode="fast")`: plain XLA matmuls (untiled) and norms, no invariance
  promise (for comparison and benchmarks); attention runs the same fixed-block kernel as
  "invariant", the fastest lowering there is.

Every invariant op is differentiable: its backward pass is the vjp of the plain-JAX reference
(`jax.custom_vjp`), so the trainer-side scorer's forward values are bitwise the rollout's while
its gradients are ordinary.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax

from pallas_kernels import matmul as _matmul
from pallas_kernels import moe as _moe
from pallas_kernels import pallas_common
from pallas_kernels import ragged_paged_attention as _rpa
from pallas_kernels import rms_norm as _rms_norm

if TYPE_CHECKING:
    from jengine.config import Numerics

BACKENDS = ("cpu", "pallas", "pallas_interpret", "tpu_interpret")


def with_reference_grad(fast: Callable, reference: Callable) -> Callable:
    """`fast`'s values with `reference`'s gradient (both take the same positional arrays)."""

    @jax.custom_vjp
    def op(*args):
        return fast(*args)

    def fwd(*args):
        return fast(*args), args

    def bwd(args, g):
        _, vjp = jax.vjp(reference, *args)
        return vjp(g)

    op.defvjp(fwd, bwd)
    return op


_INTERPRET = {"pallas": False, "pallas_interpret": True, "tpu_interpret": pallas_common.TPU_INTERPRET}


def _pallas(module_name: str, backend: str, fn: str = "kernel") -> Callable:
    """`pallas_kernels.<module_name>.<fn>`, imported on first use, `interpret` bound for `backend`."""
    module = importlib.import_module(f"pallas_kernels.{module_name}")
    return functools.partial(getattr(module, fn), interpret=_INTERPRET[backend])


# Each op: pick the forward for the numerics; wrap invariant forwards with the reference's vjp.


def _check_resolved(numerics: Numerics) -> None:
    if numerics.backend not in BACKENDS:
        raise ValueError(
            f"numerics.backend={numerics.backend!r} must be one of {BACKENDS} "
            "(resolve 'auto' with Numerics.resolved())"
        )


@functools.lru_cache(maxsize=None)
def _matmul_fn(numerics: Numerics) -> Callable:
    _check_resolved(numerics)
    if numerics.column_blocks > 1:
        blocks = numerics.column_blocks
        if numerics.mode == "invariant" and numerics.backend == "cpu":
            fwd = functools.partial(_matmul.cpu_column_blocked, blocks=blocks)
        else:
            base = _matmul_fn(dataclasses.replace(numerics, column_blocks=1))
            fwd = functools.partial(_matmul.column_blocked, base, blocks=blocks)
        return with_reference_grad(fwd, _matmul.reference)
    if numerics.mode == "fast":  # the weight-first orientation is a CPU measurement
        return _matmul.fast if numerics.backend == "cpu" else _matmul.reference
    fwd = _matmul.cpu if numerics.backend == "cpu" else _pallas("pallas_matmul", numerics.backend)
    return with_reference_grad(fwd, _matmul.reference)


@functools.lru_cache(maxsize=None)
def _rms_norm_fn(numerics: Numerics, eps: float) -> Callable:
    _check_resolved(numerics)
    ref = lambda x, w: _rms_norm.reference(x, w, eps)  # noqa: E731
    if numerics.mode == "fast":
        return ref
    if numerics.backend == "cpu":
        fwd = lambda x, w: _rms_norm.cpu(x, w, eps)  # noqa: E731
    else:
        kernel = _pallas("pallas_rms_norm", numerics.backend)
        fwd = lambda x, w: kernel(x, w, eps)  # noqa: E731
    return with_reference_grad(fwd, ref)


@functools.lru_cache(maxsize=None)
def _attention_fn(
    numerics: Numerics, sm_scale: float, sliding_window: int | None, soft_cap: float | None
) -> Callable:
    _check_resolved(numerics)
    kw = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    ref = functools.partial(_rpa.reference, **kw)
    if numerics.column_blocks > 1:
        return _head_unit_attention(numerics, ref, kw)
    # Both modes run the fixed-block kernel: it is the fastest lowering on every backend (the
    # gather-everything reference is for tests and gradients), so "fast" gains nothing without it.
    if numerics.backend == "cpu":
        fwd = functools.partial(_rpa.cpu, **kw)
    elif numerics.backend == "pallas":
        tpu = functools.partial(_pallas("tpu_ragged_paged_attention", "pallas"), **kw)
        gpu = functools.partial(_pallas("pallas_ragged_paged_attention", "pallas"), **kw)
        fwd = pallas_common.by_platform(tpu=tpu, gpu=gpu)
    else:
        generic = numerics.backend == "pallas_interpret"  # else tpu_interpret
        module = "pallas_ragged_paged_attention" if generic else "tpu_ragged_paged_attention"
        fwd = functools.partial(_pallas(module, numerics.backend), **kw)

    return _attention_with_reference_grad(fwd, ref)


def _attention_with_reference_grad(fwd: Callable, ref: Callable) -> Callable:
    """Attention with `fwd`'s values and `ref`'s gradient in q, k_pages, v_pages (page_table,
    seq_ids, positions get none)."""
    return with_reference_grad_of(fwd, ref, metadata=(3, 4, 5))


def with_reference_grad_of(fwd: Callable, ref: Callable, metadata: tuple[int, ...]) -> Callable:
    """`fwd`'s values with `ref`'s gradient in every argument but those at `metadata`.

    The metadata (integer arrays) are passed through the custom_vjp as arguments, not closed over:
    a closure over tracers (an outer jit building the metadata) cannot be differentiated. They get
    no cotangent (None).
    """

    @jax.custom_vjp
    def op(*args):
        return fwd(*args)

    def op_fwd(*args):
        return fwd(*args), args

    def op_bwd(args, g):
        slots = [i for i in range(len(args)) if i not in metadata]

        def of_differentiable(*values):
            full = list(args)
            for i, v in zip(slots, values):
                full[i] = v
            return ref(*full)

        grads = iter(jax.vjp(of_differentiable, *(args[i] for i in slots))[1](g))
        return tuple(None if i in metadata else next(grads) for i in range(len(args)))

    op.defvjp(op_fwd, op_bwd)
    return op


@functools.lru_cache(maxsize=None)
def _experts_fn(numerics: Numerics, by_rank: bool = False) -> Callable:
    _check_resolved(numerics)
    ref = functools.partial(_moe.reference, by_rank=by_rank)
    # On CPU both modes run the tiled lowering, the fastest there is (XLA:CPU's ragged_dot
    # multiplies every row by every expert: BUILD.md); on accelerators "fast" is ragged_dot.
    lowering = functools.partial(_pallas, "pallas_moe")
    if numerics.backend == "cpu":
        fwd = functools.partial(_moe.cpu, by_rank=by_rank)
    elif numerics.mode == "fast":
        return ref
    elif numerics.backend == "pallas":
        tpu = functools.partial(lowering("pallas", "tpu_kernel"), by_rank=by_rank)
        gpu = functools.partial(lowering("pallas"), by_rank=by_rank)
        fwd = pallas_common.by_platform(tpu=tpu, gpu=gpu)
    else:
        fn = "kernel" if numerics.backend == "pallas_interpret" else "tpu_kernel"
        fwd = functools.partial(lowering(numerics.backend, fn), by_rank=by_rank)
    return with_reference_grad_of(fwd, ref, metadata=(1,))  # expert_ids


def head_unit(heads: int, kv_heads: int, column_blocks: int) -> int:
    """Query heads per attention unit under `column_blocks` (heads and kv_heads: those held)."""
    return max(1, min(heads // column_blocks, heads // kv_heads))


def _head_unit_attention(numerics: Numerics, ref: Callable, kw: dict) -> Callable:
    """Attention in fixed head units (numerics.column_blocks > 1); see `Numerics.column_blocks`."""
    base = _attention_fn(dataclasses.replace(numerics, column_blocks=1), **kw)

    def split(q, k_pages, v_pages, page_table, seq_ids, positions):
        heads, kv_heads = q.shape[1], k_pages.shape[2]
        unit = head_unit(heads, kv_heads, numerics.column_blocks)
        if numerics.mode == "invariant" and numerics.backend == "cpu":
            fwd = functools.partial(_rpa.cpu_head_units, unit=unit, **kw)
        else:  # generic: one call per unit on that unit's heads (slices the pages: slow)
            group = heads // kv_heads

            def fwd(q, k, v, *meta):
                outs = []
                for u0 in range(0, heads, unit):
                    h = u0 // group
                    outs.append(base(q[:, u0 : u0 + unit], k[:, :, h : h + 1], v[:, :, h : h + 1], *meta))
                return jax.numpy.concatenate(outs, axis=1)

        op = _attention_with_reference_grad(fwd, ref)
        return op(q, k_pages, v_pages, page_table, seq_ids, positions)

    return split


def matmul(x: jax.Array, w: jax.Array, numerics: Numerics) -> jax.Array:
    """f32[M, N] = x[M, K] @ w[N, K]^T (every weight is `[out, in]`, the lm_head `[vocab, hidden]`),
    fp32 accumulation; row-invariant unless numerics is fast."""
    return _matmul_fn(numerics)(x, w)


def rms_norm(x: jax.Array, w: jax.Array, eps: float, numerics: Numerics) -> jax.Array:
    """RMSNorm over the last axis of x[M, H] (or [M, heads, D] with w[D]); x's dtype out."""
    if numerics.column_blocks > 1 and x.ndim == 3:  # one row per (token, head): head-count invariant
        m, heads, d = x.shape
        return _rms_norm_fn(numerics, float(eps))(x.reshape(m * heads, d), w).reshape(m, heads, d)
    return _rms_norm_fn(numerics, float(eps))(x, w)


def attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    seq_ids: jax.Array,
    positions: jax.Array,
    numerics: Numerics,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> jax.Array:
    """Ragged paged attention (see `ragged_paged_attention` for layout and contract)."""
    fn = _attention_fn(numerics, float(sm_scale), sliding_window, soft_cap)
    return fn(q, k_pages, v_pages, page_table, seq_ids, positions)


_MIN_ROUTER_ROWS = 16  # the Pallas matmul's smallest number of output columns


def route(
    x: jax.Array, w_router: jax.Array, numerics: Numerics, *, k: int, renormalize: bool
) -> tuple[jax.Array, jax.Array]:
    """(expert_ids i32[T, k], weights f32[T, k]) for hidden states x[T, H] and a router weight
    w_router[E, H]: router logits through the invariant matmul (fp32), then `moe.route` (softmax in
    fp32, top-k with ties to the lower index, renormalised when `renormalize`). A token's experts
    and weights are bits of its own hidden state: the same in every batch.

    A router of fewer than 16 experts (Mixtral's 8) is zero-padded to 16 rows, the Pallas matmul's
    smallest N, on every backend, and the padding's logits dropped."""
    experts = w_router.shape[0]
    if experts < _MIN_ROUTER_ROWS:
        w_router = jax.numpy.pad(w_router, ((0, _MIN_ROUTER_ROWS - experts), (0, 0)))
    logits = matmul(x, w_router, numerics)[:, :experts]
    return _moe.route(logits, k, renormalize=renormalize)


def experts(
    x: jax.Array,
    expert_ids: jax.Array,
    weights: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    numerics: Numerics,
) -> jax.Array:
    """[T, H] in x's dtype: SwiGLU experts `w_gate, w_up [E, I, H]`, `w_down [E, H, I]` applied to
    each token's k experts `expert_ids[T, k]` and combined by rank with `weights[T, k]` (see
    `moe`); batch-invariant rows unless numerics is fast. Differentiable in x, weights and the
    expert weights (the reference's gradient; expert_ids get none)."""
    _moe.validate(x, expert_ids, weights, w_gate, w_up, w_down)
    return _experts_fn(numerics)(x, expert_ids, weights, w_gate, w_up, w_down)


def expert_products(x, expert_ids, weights, w_gate, w_up, w_down, numerics: Numerics) -> jax.Array:
    """f32[T, k, H]: `experts` before its combine, each token's k weighted expert outputs in rank
    order (`moe.sum_by_rank` of them is `experts`, bit for bit). Expert parallelism gathers them
    from the devices that own the experts, then combines."""
    _moe.validate(x, expert_ids, weights, w_gate, w_up, w_down)
    return _experts_fn(numerics, by_rank=True)(x, expert_ids, weights, w_gate, w_up, w_down)


sum_by_rank = _moe.sum_by_rank


write_kv = _rpa.write_kv
apply_soft_cap = _rpa.apply_soft_cap
