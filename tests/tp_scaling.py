"""Prints the tensor-parallel scaling table (markdown) for benchmarks/RESULTS.md.

    python -m tests.tp_scaling [tp ...]      # default 1 2 4, on 8 forced CPU devices

Sets XLA_FLAGS before jax is imported (run it as its own process).
"""

import os
import sys

if __name__ == "__main__":
    if "jax" in sys.modules:
        raise RuntimeError("run as its own process: jax must not be initialised yet")
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from jengine import sharding

    sys.argv = sys.argv[:1] + (sys.argv[1:] or ["1", "2", "4"])
    sharding._main()
