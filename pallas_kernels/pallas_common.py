"""What the generic Pallas kernels (`pallas_<op>.py`) share: the GPU lowering choice and the
rule that turns a problem size into a block size.

GPU lowering: Triton. jax 0.10 lowers a bare `pl.pallas_call` to Mosaic GPU, whose generic
BlockSpec path is deprecated (JAX points to `plgpu.kernel`) and lacks what these kernels use
(gathering loads, small dots); so the kernels ask for Triton explicitly on a GPU platform. The
Triton backend is deprecated from JAX 0.11: porting to `plgpu.kernel` is the way forward there.
On TPU the same kernels lower through Mosaic TPU; with `interpret=True`, anywhere, through the
HLO interpreter.

Triton needs every loaded block to hold a power-of-two number of elements, so block sizes are
powers of two; a size that no power of two divides is handled by each kernel (a last block
shifted to end at the array's edge), never by padding a large operand.
"""

from __future__ import annotations

import jax
from jax.experimental.pallas import triton as pltriton


def compiler_params() -> pltriton.CompilerParams | None:
    """Triton's parameters on a GPU platform, None (Mosaic TPU / interpreter defaults) elsewhere."""
    return (
        pltriton.CompilerParams(num_warps=4, num_stages=2)
        if jax.default_backend() == "gpu"
        else None
    )


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
