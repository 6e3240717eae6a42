"""What the Mosaic TPU kernels a function launches hold in VMEM and SMEM, and Mosaic's block rule.

`footprints(fn, *args)` traces `fn` (abstract arguments are enough), finds every Mosaic TPU
`pallas_call` (those with `pltpu.CompilerParams`; the Triton branches `pallas_common.by_platform`
stages beside them are skipped) and counts, per kernel:
  * VMEM: each blocked input and output, its block padded to the VMEM tile (last dim to 128 lanes,
    second-to-last to 8 sublanes of 32 bits: 8 rows of f32, 16 of bf16), times its buffer count
    (2: the pipeline double-buffers every blocked operand), plus VMEM scratch once;
  * SMEM: scalar-prefetch operands (whole arrays) and SMEM scratch, 2-D arrays padded to
    (8, 128) words (conservative);
  * operands left in HBM (`pl.ANY`, copied by the kernel's own DMAs) cost nothing here.
Values the kernel body holds (vectors, spills, Mosaic's internal scratch) are not counted, so a
footprint needs headroom under the limit.

`block_rule_violations` applies Mosaic's rule (`_check_block_mappings` in jax's Mosaic lowering):
the last two dims of a VMEM block are multiples of (8, 128) or equal the array's own.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

MiB = 1 << 20
# XLA's default scoped-VMEM limit per kernel (`--xla_tpu_scoped_vmem_limit_kib`; a kernel may ask
# for more with `pltpu.CompilerParams(vmem_limit_bytes=...)`), and the physical capacity.
SCOPED_VMEM_LIMIT = {"v5e": 16 * MiB, "v6e": 32 * MiB}
_CHIPS = {"v5e": pltpu.ChipVersion.TPU_V5E, "v6e": pltpu.ChipVersion.TPU_V6E}


def capacity(chip: str) -> tuple[int, int]:
    """(VMEM, SMEM) bytes of one TensorCore of `chip` ('v5e' or 'v6e'), from jax's tpu_info."""
    if chip not in _CHIPS:
        raise ValueError(f"chip={chip!r} must be one of {sorted(_CHIPS)}")
    info = pltpu.get_tpu_info_for_chip(_CHIPS[chip], 1)
    return info.vmem_capacity_bytes, info.smem_capacity_bytes


@dataclasses.dataclass(frozen=True)
class Operand:
    """One operand of a kernel: what is allocated for it and where."""

    origin: str  # e.g. "inputs[1]", "outputs[0]", "scratch[0]", "scalar_prefetch[0]"
    memory: str  # "vmem", "smem", "hbm"
    block: tuple[int, ...]  # the allocated shape (squeezed dims dropped)
    array: tuple[int, ...]  # the whole array's shape
    dtype: str
    buffers: int
    bytes: int  # padded, times buffers
    rule_ok: bool  # Mosaic's (8, 128) block rule (always True outside VMEM)


@dataclasses.dataclass(frozen=True)
class Footprint:
    kernel: str  # the pallas_call's name
    grid: tuple[int, ...]
    operands: tuple[Operand, ...]

    @property
    def vmem_bytes(self) -> int:
        return sum(o.bytes for o in self.operands if o.memory == "vmem")

    @property
    def smem_bytes(self) -> int:
        return sum(o.bytes for o in self.operands if o.memory == "smem")


def padded_bytes(shape: tuple[int, ...], dtype: Any, memory: str = "vmem") -> int:
    """Bytes of an array of `shape` laid out in tiles: the last dim to 128, the second-to-last to
    8 rows of 32 bits (VMEM: 16 for bf16, 32 for int8; SMEM: 8 words). Rank 1 counts as (1, n)."""
    itemsize = np.dtype(dtype).itemsize
    shape = (1, *shape) if len(shape) == 1 else tuple(shape)
    sublanes = 8 * max(1, 4 // itemsize) if memory == "vmem" else 8
    *lead, rows, cols = shape
    return math.prod(lead) * -(-rows // sublanes) * sublanes * -(-cols // 128) * 128 * itemsize


def block_rule_ok(block: tuple[int | None, ...], array: tuple[int, ...]) -> bool:
    """Mosaic's rule for a VMEM block (None = squeezed, counts as 1): each of the last two dims is
    a multiple of (8, 128) respectively or equals the array's."""
    sizes = [1 if b is None else b for b in block]
    if len(sizes) == 1:
        return sizes[0] == array[0] or sizes[0] % 128 == 0
    return all(b == a or b % m == 0 for b, a, m in zip(sizes[-2:], array[-2:], (8, 128)))


def footprints(fn: Callable, *args: Any) -> list[Footprint]:
    """The Mosaic TPU kernels `fn(*args)` launches, in trace order (see the module doc)."""
    jaxpr = jax.make_jaxpr(fn)(*args)
    return [_footprint(eqn) for eqn in _pallas_calls(jaxpr.jaxpr)]


def _pallas_calls(jaxpr: Any) -> Iterator[Any]:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            if isinstance(eqn.params.get("compiler_params"), pltpu.CompilerParams):
                yield eqn
            continue
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    yield from _pallas_calls(inner)


def _memory(space: Any) -> str:
    """'smem', 'hbm' (pl.ANY / HBM: left to the kernel's DMAs) or 'vmem' (also the default)."""
    name = str(space).lower()
    return "smem" if "smem" in name else "hbm" if "any" in name or "hbm" in name else "vmem"


def _footprint(eqn: Any) -> Footprint:
    gm = eqn.params["grid_mapping"]
    name = eqn.params.get("name") or "pallas_call"
    operands = []
    for i, aval in enumerate(eqn.invars[: gm.num_index_operands]):
        shape, dtype = tuple(aval.aval.shape), aval.aval.dtype
        operands.append(
            Operand(
                f"scalar_prefetch[{i}]",
                "smem",
                shape,
                shape,
                str(dtype),
                1,
                padded_bytes(shape, dtype, "smem"),
                True,
            )
        )
    for j, bm in enumerate(gm.block_mappings):
        kind = "inputs" if j < gm.num_inputs else "outputs"
        index = j if j < gm.num_inputs else j - gm.num_inputs
        array = tuple(bm.array_aval.shape)
        memory = _memory(bm.block_aval.memory_space)
        dims = [None if isinstance(d, pl.Squeezed) else d.block_size for d in bm.block_shape]
        block = tuple(d for d in dims if d is not None)
        buffers = 1 if memory != "vmem" else getattr(bm.pipeline_mode, "buffer_count", 2)
        size = 0 if memory == "hbm" else padded_bytes(block, bm.array_aval.dtype, memory) * buffers
        ok = memory != "vmem" or block_rule_ok(tuple(dims), array)
        operands.append(
            Operand(
                f"{kind}[{index}]",
                memory,
                block,
                array,
                str(bm.array_aval.dtype),
                buffers,
                size,
                ok,
            )
        )
    for k, aval in enumerate(gm.scratch_avals):
        if "sem" in str(getattr(aval, "dtype", "sem")):  # DMA / barrier semaphores
            continue
        memory = _memory(getattr(aval, "memory_space", None))
        shape = tuple(aval.shape)
        operands.append(
            Operand(
                f"scratch[{k}]",
                memory,
                shape,
                shape,
                str(aval.dtype),
                1,
                padded_bytes(shape, aval.dtype, memory),
                True,
            )
        )
    return Footprint(name, tuple(gm.grid), tuple(operands))


def block_rule_violations(footprint: Footprint) -> list[str]:
    """Operands of `footprint` that break Mosaic's (8, 128) block rule, described."""
    return [
        f"{footprint.kernel} {o.origin}: block {o.block} of array {o.array}"
        for o in footprint.operands
        if not o.rule_ok
    ]
