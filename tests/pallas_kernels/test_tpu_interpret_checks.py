"""`pallas_common.TPU_INTERPRET` has its checks on: a read of a DMA's destination before its wait
is reported as a race and reads NaN, and an out-of-bounds read raises. (The kernel tests rely on
these to mean something when they pass.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.pallas_common import TPU_INTERPRET

BLOCK = (8, 128)


def _read_before_wait(x_hbm, o_ref, buf, sem):
    copy = pltpu.make_async_copy(x_hbm, buf, sem.at[0])
    copy.start()
    o_ref[...] = buf[...]  # the bug: the copy has not been waited for
    copy.wait()


def _read_past_the_block(x_ref, o_ref):
    o_ref[...] = x_ref[pl.ds(pl.program_id(0) + 8, 8), :]  # rows 8..15 of an 8-row block


def test_read_before_wait_is_a_race_and_reads_nan(capfd):
    kernel = pl.pallas_call(
        _read_before_wait,
        out_shape=jax.ShapeDtypeStruct(BLOCK, jnp.float32),
        in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=pl.BlockSpec(BLOCK, lambda: (0, 0)),
        scratch_shapes=[pltpu.VMEM(BLOCK, jnp.float32), pltpu.SemaphoreType.DMA((1,))],
        interpret=TPU_INTERPRET,
    )
    out = jax.jit(kernel)(jnp.ones(BLOCK, jnp.float32))
    assert np.all(np.isnan(np.asarray(out)))  # uninitialised scratch, not the copied ones
    assert "RACE DETECTED" in capfd.readouterr().out


def test_out_of_bounds_read_raises():
    kernel = pl.pallas_call(
        _read_past_the_block,
        out_shape=jax.ShapeDtypeStruct(BLOCK, jnp.float32),
        grid=(1,),
        in_specs=[pl.BlockSpec(BLOCK, lambda i: (0, 0))],
        out_specs=pl.BlockSpec(BLOCK, lambda i: (0, 0)),
        interpret=TPU_INTERPRET,
    )
    try:
        with pytest.raises(Exception, match="Out-of-bounds read"):
            jax.block_until_ready(jax.jit(kernel)(jnp.ones((16, 128), jnp.float32)))
    finally:
        pltpu.reset_tpu_interpret_mode_state()  # an interpreted kernel that raised leaves state
