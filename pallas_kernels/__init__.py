"""Batch-invariant kernels for jengine: each op has a plain-JAX reference, a fixed-tile CPU
lowering and a Pallas kernel (TPU / GPU, interpret mode for tests). Use them through `ops`."""

from pallas_kernels import ops
from pallas_kernels.ops import Numerics

__all__ = ["ops", "Numerics"]
