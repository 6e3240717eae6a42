"""What the generic Pallas kernels (`pallas_<op>.py`) share: the lowering choice, the TPU
interpret-mode checks, and the rule that turns a problem size into a block size.

Lowering, chosen by the platform the program is lowered for, never by the machine tracing it
(`pallas_call` below):
  * `interpret=False`: both a Triton call (`cuda`, `rocm`) and a Mosaic TPU call (`tpu`) are
    staged out under `lax.platform_dependent`; lowering keeps only the target platform's branch.
    So one traced step exports for `cuda` and for `tpu` from a CPU machine (CI), and a bare
    `pallas_call` never reaches Mosaic GPU (jax >= 0.9 sends a call without compiler params
    there, and these kernels use what its `pallas_call` path lacks: gathering loads, small dots).
  * `interpret=True`: the HLO interpreter, anywhere (the `pallas_interpret` backend).
  * `interpret=TPU_INTERPRET` (a `pltpu.InterpretParams`): the Mosaic TPU call under Pallas' TPU
    interpreter (the `tpu_interpret` backend), which simulates VMEM/SMEM/HBM, DMAs and
    semaphores on CPU, raises on out-of-bounds reads, fills uninitialised memory with NaN,
    shuffles the order of `parallel` grid points, and prints "RACE DETECTED" on a data race.

Triton is deprecated from JAX 0.11 (Mosaic GPU replaces it); the kernels keep using it until the
`plgpu` port (BUILD.md), so that one DeprecationWarning is silenced below.

Triton needs every loaded block to hold a power-of-two number of elements, so block sizes are
powers of two; a size that no power of two divides is handled by each kernel (a last block
shifted to end at the array's edge), never by padding a large operand. Mosaic TPU needs a
block's last two dims to be multiples of (8, 128) or the array's own (`tpu_vmem` checks it).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

# Silence the Pallas Triton backend's deprecation (JAX >= 0.11) and nothing else: only
# DeprecationWarnings whose message names Triton. Installed before Triton is first imported.
warnings.filterwarnings(
    "ignore", message=r"(?s)(.*triton.*deprecat|.*deprecat.*triton)", category=DeprecationWarning
)

# TPU interpret mode with every check on (the `tpu_interpret` backend): one core, as on v5e/v6e;
# a DMA's data lands only when it is waited for, so a read before the wait sees stale data (NaN in
# fresh scratch) and is reported as a race. The kernel tests also run two cores (v4/v5p megacore),
# where two programs writing one block race; that costs ~50x per call (thread start-up), too slow
# for a whole engine.
TPU_INTERPRET = pltpu.InterpretParams(
    detect_races=True,
    out_of_bounds_reads="raise",
    uninitialized_memory="nan",
    dma_execution_mode="on_wait",
)

Interpret = bool | pltpu.InterpretParams  # False (compile), True (HLO interpreter), TPU params


@functools.cache
def _triton_params() -> Any:
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=4, num_stages=2)


def by_platform(*, tpu: Callable | None, gpu: Callable) -> Callable:
    """A callable that runs `tpu` when lowered for TPU and `gpu` for CUDA/ROCm (both are traced;
    lowering keeps one). `tpu=None`: lowering for TPU raises (a GPU-only kernel)."""
    branches = {"cuda": gpu, "rocm": gpu} | ({"tpu": tpu} if tpu is not None else {})
    return lambda *args: jax.lax.platform_dependent(*args, **branches)


def pallas_call(
    kernel: Callable,
    *,
    interpret: Interpret,
    grid: tuple[int, ...],
    tpu: bool = True,
    **kwargs: Any,
) -> Callable:
    """`pl.pallas_call(kernel, grid=grid, **kwargs)` lowered as `interpret` says (module doc).

    Every grid axis is independent (`parallel` on Mosaic). `tpu=False` marks a GPU-only kernel:
    it has no Mosaic TPU branch (lowering it for TPU raises) and no TPU interpret mode.
    """
    if interpret is True:
        return pl.pallas_call(kernel, grid=grid, interpret=True, **kwargs)
    mosaic = pltpu.CompilerParams(dimension_semantics=("parallel",) * len(grid))
    if interpret:
        if not tpu:
            raise ValueError(
                f"{kernel.__name__} has no TPU version: interpret={interpret!r} needs one"
            )
        return pl.pallas_call(
            kernel, grid=grid, compiler_params=mosaic, interpret=interpret, **kwargs
        )
    triton = pl.pallas_call(kernel, grid=grid, compiler_params=_triton_params(), **kwargs)
    tpu_call = pl.pallas_call(kernel, grid=grid, compiler_params=mosaic, **kwargs) if tpu else None
    return by_platform(tpu=tpu_call, gpu=triton)


def pow2_block(size: int, cap: int) -> int:
    """The largest power of two that divides `size`, at most `cap`.

    A function of the problem size only, so a given model always gets the same blocks.
    """
    if size < 1:
        raise ValueError(f"{size=} must be positive")
    return min(size & -size, cap)


def floor_pow2(size: int) -> int:
    """The largest power of two <= `size`."""
    if size < 1:
        raise ValueError(f"{size=} must be positive")
    return 1 << (size.bit_length() - 1)
