"""Tensor / data parallelism change no bit (issue #6).

The multi-device part runs `tests/sharding_check.py` in a subprocess with 8 forced CPU devices
(this process may already have initialised jax with one device). The rest runs here.
"""

import json
import os
import subprocess
import sys

import pytest

from jengine import EngineConfig, ModelConfig
from jengine.models.transformer import param_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_check(*args: str) -> dict:
    """Runs tests/sharding_check.py on 8 forced CPU devices; returns its JSON report."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.sharding_check", "--devices", "8", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def multi_device_report():
    return run_check()


def test_every_mesh_is_bitwise_the_single_device_run(multi_device_report):
    r = multi_device_report
    assert r["devices"] == 8
    assert r["score_equals_reference"], "single-device score differs from the single-device engine"
    bad = {k: v for k, v in r["configs"].items() if not v["bitwise_equal"]}
    assert not bad, f"tokens/logprobs differ from the single-device run: {bad}"
    assert set(r["configs"]) == {"1x1", "2x1", "4x1", "8x1", "1x2", "2x2", "2x4"}


def test_sharded_score_and_rl_scorer_match(multi_device_report):
    for mesh in ("8x1", "2x2"):
        assert multi_device_report[f"score_mesh_{mesh}_equals_reference"], mesh
        assert multi_device_report[f"rl_mesh_{mesh}_equals_reference"], mesh


def test_params_and_kv_are_really_sharded(multi_device_report):
    c = multi_device_report["configs"]
    # tiny: 2 layers, vocab 512, hidden 128, 8 heads x 16, 2 KV heads, intermediate 384
    s4 = c["4x1"]["shards"]
    assert c["4x1"]["shard_devices"] == 4
    assert s4["embed"] == [[128, 128]]  # vocabulary rows split
    assert s4["wq"] == [[2, 32, 128]]  # output rows ([layers, out, in]) split: 2 heads per device
    assert s4["w_down"] == [[2, 32, 384]]
    assert s4["wk"] == [[2, 32, 128]]  # 2 KV heads < tp=4: k/v weights replicated...
    # ...each device stores 1 KV head of the [dp, layers, pages, page, kv_heads, D] cache
    assert s4["k_pages"][0][4] == 1 and c["4x1"]["kv_shape"][4] == 4
    assert s4["final_norm"] == [[128]]
    s2 = c["2x1"]["shards"]
    assert s2["wk"] == [[2, 16, 128]]  # 2 KV heads over tp=2: split
    assert s2["k_pages"][0][4] == 1 and c["2x1"]["kv_shape"][4] == 2
    s8 = c["8x1"]["shards"]
    assert s8["wq"] == [[2, 16, 128]] and s8["embed"] == [[64, 128]]


def test_data_parallel_replicas_use_disjoint_devices(multi_device_report):
    c = multi_device_report["configs"]
    assert c["2x4"]["replica_devices"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert c["1x2"]["replica_devices"] == [[0], [1]]
    assert all(c["2x4"]["replica_wrote_kv"]) and all(c["1x2"]["replica_wrote_kv"])
    assert c["2x4"]["kv_shape"][0] == 4  # one KV pool per data row


@pytest.mark.slow
def test_qwen_family_kv_split_and_replicated_paths():
    """qkv bias, qk-norm (per-head rows), untied lm_head; 4 KV heads: split at tp=2, replicated at
    tp=8; sharded score over a (data 2, model 4) mesh."""
    r = run_check("--family", "tiny-qwen", "--configs", "2x1,8x1", "--score-meshes", "4x2")
    assert r["score_equals_reference"]
    assert all(v["bitwise_equal"] for v in r["configs"].values()), r["configs"]
    wk = {c: [s[1:] for s in r["configs"][c]["shards"]["wk"]] for c in ("2x1", "8x1")}  # [L, ...]
    assert wk["2x1"] == [[32, 128]]  # 2 of the 4 KV heads per device
    assert wk["8x1"] == [[64, 128]]  # replicated (4 < 8)
    assert r["score_mesh_4x2_equals_reference"]


# -- in-process (one device is enough) -----------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "qwen3-0.6b", "qwen2.5-0.5b", "llama-3.2-1b"])
def test_param_specs_cover_every_param(name):
    import jax
    from jax.sharding import PartitionSpec as P

    from jengine import sharding

    cfg = ModelConfig.named(name)
    for tp in (1, 2, 4):
        specs = sharding.param_specs(cfg, tp)
        shapes = param_shapes(cfg)
        is_shape = lambda x: isinstance(x, tuple) and not isinstance(x, P)
        s_paths = [k for k, _ in jax.tree_util.tree_flatten_with_path(shapes, is_leaf=is_shape)[0]]
        p_leaves = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[
            0
        ]
        assert [k for k, _ in p_leaves] == s_paths
        for (path, spec), shape in zip(
            p_leaves, jax.tree_util.tree_leaves(shapes, is_leaf=is_shape)
        ):
            assert len(spec) <= len(shape), path
            for axis, name_ in enumerate(spec):
                if name_ == sharding.MODEL:
                    assert shape[axis] % tp == 0, (path, shape, tp)


def test_column_blocks_validation():
    from jengine import sharding

    with pytest.raises(ValueError, match="multiple of tensor_parallel_size"):
        EngineConfig(tensor_parallel_size=4, column_blocks=6)
    assert EngineConfig(tensor_parallel_size=2, column_blocks=8).column_blocks == 8
    tiny = ModelConfig.named("tiny")
    sharding.check_model(tiny, 8, 8)
    with pytest.raises(ValueError, match="column_blocks=3"):
        sharding.check_model(tiny, 1, 3)
    with pytest.raises(ValueError, match="one must divide the other"):
        sharding.check_model(tiny.replace(num_heads=6, num_kv_heads=3, hidden_size=96), 2, 2)
    from jengine.config import Numerics, resolve_numerics

    assert resolve_numerics(None, 4).column_blocks == 4
    assert EngineConfig(tensor_parallel_size=4).resolved_numerics().column_blocks == 4
    with pytest.raises(ValueError, match="multiple of tensor_parallel_size"):
        resolve_numerics(Numerics(column_blocks=6), 4)


def test_mesh_needs_enough_devices():
    import jax

    from jengine import sharding

    with pytest.raises(ValueError, match="needs"):
        sharding.make_mesh(len(jax.devices()) + 1, 1)
    mesh = sharding.make_mesh(1, 1)
    assert dict(mesh.shape) == {"data": 1, "model": 1}


def test_column_blocks_numerics_are_invariant_to_the_slice_a_device_holds():
    """What makes TP bitwise, checked on one device: a device's column / head slice computed with
    column_blocks / tp blocks equals the same slice of the full computation with column_blocks."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jengine.config import Numerics
    from pallas_kernels import ops
    from pallas_kernels import ragged_paged_attention as rpa

    rng = np.random.default_rng(0)
    c = 8
    full_n = Numerics(column_blocks=c).resolved()

    def local(tp):
        return Numerics(column_blocks=c // tp).resolved()

    def jitted(op, numerics):
        return jax.jit(lambda *arrays: op(*arrays, numerics))

    x = jnp.asarray(rng.standard_normal((40, 128)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((384, 128)), jnp.float32)
    lm = jnp.asarray(rng.standard_normal((512, 128)), jnp.float32)
    y = np.asarray(jax.jit(lambda x, w: ops.matmul(x, w, full_n))(x, w))
    logits = np.asarray(jax.jit(lambda x, w: ops.matmul(x, w, full_n))(x, lm))
    np.testing.assert_allclose(y, np.asarray(x @ w.T), rtol=1e-4, atol=1e-4)
    for tp in (2, 8):
        n, v = 384 // tp, 512 // tp
        mm = jitted(ops.matmul, local(tp))
        for d in (0, tp - 1):
            assert np.array_equal(
                np.asarray(mm(x, w[d * n : (d + 1) * n])), y[:, d * n : (d + 1) * n]
            )
            assert np.array_equal(
                np.asarray(mm(x, lm[d * v : (d + 1) * v])), logits[:, d * v : (d + 1) * v]
            )

    # attention and per-head RMSNorm: 8 query heads, 2 KV heads (the tiny model's GQA)
    q = jnp.asarray(rng.standard_normal((24, 8, 16)), jnp.float32)
    kp = jnp.asarray(rng.standard_normal((6, 16, 2, 16)), jnp.float32)
    vp = jnp.asarray(rng.standard_normal((6, 16, 2, 16)), jnp.float32)
    table = jnp.asarray(np.arange(6).reshape(2, 3), jnp.int32)
    seq_ids = jnp.asarray(np.repeat([0, 1], 12), jnp.int32)
    pos = jnp.asarray(np.r_[np.arange(12) + 30, np.arange(12)], jnp.int32)

    def attn(numerics):
        return jax.jit(
            lambda q, k, v: ops.attention(q, k, v, table, seq_ids, pos, numerics, sm_scale=0.25)
        )

    out = np.asarray(attn(full_n)(q, kp, vp))
    def reference(q, k, v):
        return rpa.reference(q, k, v, table, seq_ids, pos, sm_scale=0.25)

    ref = np.asarray(jax.jit(reference)(q, kp, vp))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    g = jnp.asarray(rng.standard_normal(16), jnp.float32)
    normed = np.asarray(jax.jit(lambda q: ops.rms_norm(q, g, 1e-6, full_n))(q))
    for tp in (2, 8):
        heads = 8 // tp
        fn = attn(local(tp))
        for d in (0, tp - 1):
            kv0 = d * 2 // tp
            part = fn(
                q[:, d * heads : (d + 1) * heads], kp[:, :, kv0 : kv0 + 1], vp[:, :, kv0 : kv0 + 1]
            )
            assert np.array_equal(np.asarray(part), out[:, d * heads : (d + 1) * heads]), (tp, d)
        part = jitted(lambda q, numerics: ops.rms_norm(q, g, 1e-6, numerics), local(tp))(
            q[:, :heads]
        )
        assert np.array_equal(np.asarray(part), normed[:, :heads])

    # differentiable like the default path (the backward pass is the reference's)
    grad = jax.grad(lambda q: attn(full_n)(q, kp, vp).sum())(q)
    grad_ref = jax.grad(lambda q: reference(q, kp, vp).sum())(q)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(grad_ref), rtol=1e-4, atol=1e-5)
