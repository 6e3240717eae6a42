"""Batch-invariant kernels for jengine: each op has a plain-JAX reference, a fixed-tile CPU
lowering and a Pallas kernel (TPU / GPU, interpret mode for tests). Use them through `ops`, with a
resolved `jengine.config.Numerics` choosing the lowering."""
