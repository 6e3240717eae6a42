"""Assertions shared by the kernel tests: exact bits, tolerance by dtype, lowering for platforms
this machine does not have, and the backends every op is tested on."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from jax import export
from jax._src.pallas.mosaic import tpu_info

from pallas_kernels import pallas_common

# Every op on these: the fixed-tile CPU lowering, and on CPU the generic kernels in the HLO
# interpreter and the Mosaic TPU kernels in TPU interpret mode, on a GPU/TPU the compiled kernels.
ON_DEVICE = jax.default_backend() in ("gpu", "tpu")
BACKENDS = ("cpu", "pallas") if ON_DEVICE else ("cpu", "pallas_interpret", "tpu_interpret")
# Two simulated TensorCores (v4/v5p megacore): `parallel` grid points split between them, so two
# programs writing one block race. ~50x slower per call than one core: kernel tests only.
TPU_INTERPRET_2_CORES = dataclasses.replace(pallas_common.TPU_INTERPRET, num_cores_or_threads=2)

# Tolerance relative to the reference's largest magnitude: fp32 math (bf16 inputs are exact in
# fp32 products) vs. one bf16 rounding of the output.
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def bits(a: jax.Array) -> np.ndarray:
    """The raw bits of `a` (so -0.0 != 0.0 and NaN payloads count)."""
    a = np.asarray(a)
    return a.view(f"u{a.dtype.itemsize}")


def assert_bitwise(actual: jax.Array, expected: jax.Array) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    differ = np.count_nonzero(bits(actual) != bits(expected))
    assert np.array_equal(bits(actual), bits(expected)), f"{differ} of {actual.size} values differ"


def assert_close(actual: jax.Array, expected: jax.Array, dtype) -> None:
    """Values within TOL[dtype] of `expected`; infinities must match exactly."""
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    finite = np.isfinite(expected)
    assert np.array_equal(np.isfinite(actual), finite)
    assert np.array_equal(actual[~finite], expected[~finite])
    tol = TOL[dtype]
    scale = float(np.max(np.abs(expected[finite]), initial=0.0))
    np.testing.assert_allclose(actual[finite], expected[finite], rtol=tol, atol=tol * scale)


def lower_for(platform: str, fn: Callable, *args) -> str:
    """Lowers jit(fn) for 'cuda' (Pallas -> Triton IR) or 'tpu' (Pallas -> Mosaic MLIR) on this
    CPU-only machine; returns the StableHLO text. Nothing is compiled for the device, so this
    proves the kernel passes the Pallas lowering rules (Triton's power-of-two blocks, Mosaic's
    (8, 128) block rule), not that the device compiler accepts it. The kernels choose their
    lowering by the export's platform alone; only Mosaic's device-kind lookup is mocked.
    """
    triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    with (
        mock.patch.object(tpu_info, "get_device_kind", lambda: "TPU v5e"),
        mock.patch.object(tpu_info, "get_num_device_cores", lambda: 1),
    ):
        exporter = export.export(
            jax.jit(lambda *a: fn(*a)), platforms=[platform], disabled_checks=[triton]
        )
        return exporter(*args).mlir_module()


def kernel_calls(mlir: str) -> dict[str, int]:
    """Pallas kernels in lowered StableHLO text: {'triton' | 'mosaic_tpu' | 'mosaic_gpu': count}."""
    return {
        "triton": mlir.count("@__gpu$xla.gpu.triton("),
        "mosaic_tpu": mlir.count("@tpu_custom_call("),
        "mosaic_gpu": mlir.count("mosaic_gpu"),
    }


def assert_no_races(capfd) -> None:
    """TPU interpret mode prints "RACE DETECTED" (and carries on) when it finds a data race."""
    out, err = capfd.readouterr()
    assert "RACE DETECTED" not in out + err, (out + err)[-4000:]
