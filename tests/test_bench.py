"""`python benchmarks/bench.py` at its smallest size completes and prints every table (no speed
checks); the transformers baseline holds jengine's weights."""

import os
import subprocess
import sys

from benchmarks import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_tiny_runs_and_prints_tables():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    p = subprocess.run(
        [sys.executable, "benchmarks/bench.py", "--size", "tiny"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    for header in bench.HEADERS:
        assert f"## {header}" in p.stdout, (header, p.stdout[-3000:])
    assert (
        "| engine |" in p.stdout and "jengine invariant" in p.stdout and "jengine fast" in p.stdout
    )


def test_table_formats_rows():
    out = bench.table("T", [{"a": 1, "b": 2.5}, {"a": 3}])
    assert out.splitlines()[0] == "## T"
    assert "| a | b |" in out and "| 3 |  |" in out
    assert "(no rows)" in bench.table("Empty", [])


def test_transformers_baseline_holds_the_same_weights():
    """The rollout baseline's torch model is built from jengine's params; a wrong layout (or a
    missed tensor) shows up as logprobs far from jengine's."""
    from jengine import Model, ModelConfig, init_params

    tiny = ModelConfig.named("tiny")
    for config in (  # Llama, Qwen2 (qkv bias, untied head), Qwen3 (qk-norm)
        tiny,
        tiny.replace(qkv_bias=True, tie_word_embeddings=False),
        tiny.replace(qk_norm=True),
    ):
        model = Model(config, init_params(config, seed=0))
        assert bench.hf_parity(model, bench.torch_model_from(model), [1, 5, 9, 2, 7, 3]) < 1e-4
