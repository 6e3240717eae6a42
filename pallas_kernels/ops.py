"""The one door the model uses: `ops.matmul`, `ops.lm_head`, `ops.rms_norm`, `ops.log_softmax`,
`ops.attention`, each taking a `Numerics` that says which lowering to run.

* `Numerics(mode="invariant", backend="cpu")`: fixed-tile plain JAX (fast on CPU, batch-invariant).
* `Numerics(mode="invariant", backend="pallas")`: the Pallas kernels (`pallas_<op>.py`: Triton on
  GPU, Mosaic on TPU, where attention uses `tpu_ragged_paged_attention`);
  `backend="pallas_interpret"` runs the generic kernels in interpret mode (tests on CPU).
* `Numerics(mode="fast")`: plain XLA ops, no invariance promise (for comparison and benchmarks).

Every invariant op is differentiable: its backward pass is the vjp of the plain-JAX reference
(`jax.custom_vjp`), so the trainer-side scorer's forward values are bitwise the rollout's while
its gradients are ordinary.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable

import jax

from pallas_kernels import log_softmax as _log_softmax
from pallas_kernels import matmul as _matmul
from pallas_kernels import ragged_paged_attention as _rpa
from pallas_kernels import rms_norm as _rms_norm

BACKENDS = ("cpu", "pallas", "pallas_interpret")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Numerics:
    """Which lowering every op uses. Hashable: a static argument of the jitted step."""

    mode: str = "invariant"
    backend: str = "cpu"

    def __post_init__(self) -> None:
        if self.mode not in ("invariant", "fast"):
            raise ValueError(f"mode={self.mode!r} must be 'invariant' or 'fast'")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} must be one of {BACKENDS}")


def default_backend(requested: str = "auto") -> str:
    """'auto' -> 'cpu' on a CPU platform, 'pallas' on TPU/GPU."""
    if requested != "auto":
        if requested not in BACKENDS:
            raise ValueError(f"kernel_backend={requested!r} must be 'auto' or one of {BACKENDS}")
        return requested
    return "cpu" if jax.default_backend() == "cpu" else "pallas"


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


def _pallas(module_name: str, backend: str, fn: str = "kernel") -> Callable:
    """`pallas_kernels.<module_name>.<fn>`, imported on first use, interpret flag bound."""
    module = importlib.import_module(f"pallas_kernels.{module_name}")
    return functools.partial(getattr(module, fn), interpret=backend == "pallas_interpret")


# Each op: pick the forward for the numerics; wrap invariant forwards with the reference's vjp.


@functools.lru_cache(maxsize=None)
def _matmul_fn(numerics: Numerics) -> Callable:
    if numerics.mode == "fast":
        return _matmul.reference
    fwd = _matmul.cpu if numerics.backend == "cpu" else _pallas("pallas_matmul", numerics.backend)
    return with_reference_grad(fwd, _matmul.reference)


@functools.lru_cache(maxsize=None)
def _lm_head_fn(numerics: Numerics) -> Callable:
    if numerics.mode == "fast":
        return _matmul.reference_nt
    if numerics.backend == "cpu":
        fwd = _matmul.cpu_nt
    else:
        fwd = _pallas("pallas_matmul", numerics.backend, "kernel_nt")
    return with_reference_grad(fwd, _matmul.reference_nt)


@functools.lru_cache(maxsize=None)
def _rms_norm_fn(numerics: Numerics, eps: float) -> Callable:
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
def _log_softmax_fn(numerics: Numerics) -> Callable:
    if numerics.mode == "fast":
        return _log_softmax.reference
    fwd = _log_softmax.cpu if numerics.backend == "cpu" else _pallas("pallas_log_softmax", numerics.backend)
    return with_reference_grad(fwd, _log_softmax.reference)


@functools.lru_cache(maxsize=None)
def _attention_fn(
    numerics: Numerics, sm_scale: float, sliding_window: int | None, soft_cap: float | None
) -> Callable:
    kw = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    ref = functools.partial(_rpa.reference, **kw)
    if numerics.mode == "fast":
        return ref
    if numerics.backend == "cpu":
        fwd = functools.partial(_rpa.cpu, **kw)
    else:
        on_tpu = numerics.backend == "pallas" and jax.default_backend() == "tpu"
        module = "tpu_ragged_paged_attention" if on_tpu else "pallas_ragged_paged_attention"
        fwd = functools.partial(_pallas(module, numerics.backend), **kw)

    def split(q, k_pages, v_pages, page_table, seq_ids, positions):
        # integer metadata carries no gradient: close over it
        g = with_reference_grad(
            lambda q, k, v: fwd(q, k, v, page_table, seq_ids, positions),
            lambda q, k, v: ref(q, k, v, page_table, seq_ids, positions),
        )
        return g(q, k_pages, v_pages)

    return split


def matmul(x: jax.Array, w: jax.Array, numerics: Numerics) -> jax.Array:
    """f32[M, N] = x[M, K] @ w[K, N], fp32 accumulation; row-invariant unless numerics is fast."""
    return _matmul_fn(numerics)(x, w)


def lm_head(x: jax.Array, w: jax.Array, numerics: Numerics) -> jax.Array:
    """f32[M, V] = x[M, K] @ w[V, K]^T (the embedding layout), fp32 accumulation."""
    return _lm_head_fn(numerics)(x, w)


def rms_norm(x: jax.Array, w: jax.Array, eps: float, numerics: Numerics) -> jax.Array:
    """RMSNorm over the last axis of x[M, H] (or [M, heads, D] with w[D]); x's dtype out."""
    return _rms_norm_fn(numerics, float(eps))(x, w)


def log_softmax(z: jax.Array, numerics: Numerics) -> jax.Array:
    """f32[M, V] log-softmax over the last axis (masked -inf entries stay -inf)."""
    return _log_softmax_fn(numerics)(z)


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


write_kv = _rpa.write_kv
