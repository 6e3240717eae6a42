"""Every kernel call of an engine step at real model shapes (`model_shapes`): it exports with
`jax.export` for `cuda` (Triton only) and `tpu` (Mosaic only) from this CPU machine, and its
Mosaic TPU kernels fit v5e/v6e VMEM and SMEM and keep Mosaic's (8, 128) block rule.

    python -m tests.pallas_kernels.test_real_shapes    # prints the VMEM/SMEM table (BUILD.md)
"""

from __future__ import annotations

import pytest

from pallas_kernels import tpu_vmem
from tests.pallas_kernels.checks import kernel_calls, lower_for
from tests.pallas_kernels.model_shapes import MODELS, shape, step_calls

TARGET = {"cuda": "triton", "tpu": "mosaic_tpu"}

# Over a limit, known and reported in BUILD.md (a test fails when this set changes either way):
# the attention kernel prefetches the whole page table into SMEM, so 64 sequences x a page table
# as long as Llama's 131072 positions overflow SMEM (cap max_model_len or max_num_seqs on TPU).
KNOWN_OVER = {
    ("llama-3.2-1b", "attention", "v5e SMEM"),
    ("llama-3.2-1b", "attention", "v6e SMEM"),
}


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("model", MODELS)
def test_kernels_export_at_real_shapes(model, platform):
    for name, (fn, args) in step_calls(shape(model), tokens=64).items():
        calls = kernel_calls(lower_for(platform, fn, *args))
        other = {k: v for k, v in calls.items() if k != TARGET[platform]}
        assert calls[TARGET[platform]] >= 1 and not any(other.values()), (name, calls)


def over_limits(model: str) -> tuple[set, list[str]]:
    """(the (model, call, 'chip MEMORY') triples over a limit, Mosaic block-rule violations)."""
    over, bad = set(), []
    for name, (fn, args) in step_calls(shape(model)).items():
        for fp in tpu_vmem.footprints(fn, *args):
            bad += tpu_vmem.block_rule_violations(fp)
            for chip, limit in tpu_vmem.SCOPED_VMEM_LIMIT.items():
                if fp.vmem_bytes >= limit:  # at the limit nothing is left for the body
                    over.add((model, name.split(" (")[0], f"{chip} VMEM"))
                if fp.smem_bytes >= tpu_vmem.capacity(chip)[1]:
                    over.add((model, name.split(" (")[0], f"{chip} SMEM"))
    return over, bad


@pytest.mark.parametrize("model", MODELS)
def test_tpu_kernels_fit_vmem_and_keep_the_block_rule(model):
    over, bad = over_limits(model)
    assert not bad
    assert over == {k for k in KNOWN_OVER if k[0] == model}


@pytest.mark.parametrize("model", ["tiny", "smollm2-135m", "qwen2.5-0.5b"])
def test_block_rule_at_other_shipped_shapes(model):
    """TPU interpret mode does not apply Mosaic's block rule: check it at the shapes the engine's
    TPU-interpret test runs (`tiny`) and at the other shipped configs."""
    for fn, args in step_calls(shape(model), tokens=64, seqs=16).values():
        for fp in tpu_vmem.footprints(fn, *args):
            assert not tpu_vmem.block_rule_violations(fp)


def table() -> str:
    """Markdown: each TPU kernel's VMEM and SMEM per model at the engine's default sizes."""
    mib = lambda b: f"{b / tpu_vmem.MiB:.2f}"  # noqa: E731
    lines = [
        "| model | call | kernel | grid | VMEM MiB | SMEM MiB | v5e (16 MiB) | v6e (32 MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model in MODELS:
        for name, (fn, args) in step_calls(shape(model)).items():
            for fp in tpu_vmem.footprints(fn, *args):
                fits = []
                for chip, limit in tpu_vmem.SCOPED_VMEM_LIMIT.items():
                    smem = tpu_vmem.capacity(chip)[1]
                    ok = fp.vmem_bytes < limit and fp.smem_bytes < smem
                    fits.append("fits" if ok else "**over**")
                lines.append(
                    f"| {model} | {name} | {fp.kernel} | {fp.grid} | {mib(fp.vmem_bytes)} "
                    f"| {mib(fp.smem_bytes)} | {fits[0]} | {fits[1]} |"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
