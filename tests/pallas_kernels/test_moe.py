"""Mixture-of-experts: routing against numpy and Hugging Face's routers (ties to the lower index),
and the expert kernel (the CPU lowering, the generic Pallas kernel in HLO interpret mode, the
Mosaic TPU kernel in TPU interpret mode; compiled on a GPU/TPU machine), all through `ops`: every
row bitwise the invariant dense MLP of its experts combined by rank, bitwise the same whatever its
experts received, its batch mates and the batch size; values against a float64 numpy MoE;
gradients against torch autograd."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jengine.config import Numerics
from pallas_kernels import moe, ops, pallas_moe, tpu_vmem
from tests.pallas_kernels.checks import (
    BACKENDS,
    TPU_INTERPRET_2_CORES,
    assert_bitwise,
    assert_close,
    assert_no_races,
    kernel_calls,
    lower_for,
)

# 192: gate/up have a shifted last column block and down three K blocks in the Pallas kernels
HIDDEN, INTER, EXPERTS, K = 256, 192, 8, 4  # k >= 3: a sum of two is the same in either order


def _normal(rng, shape, dtype, scale=1.0) -> jax.Array:
    return jnp.asarray(rng.standard_normal(shape, np.float32) * scale, dtype)


def _experts_weights(rng, dtype, experts=EXPERTS):
    w_gate = _normal(rng, (experts, INTER, HIDDEN), dtype, 0.06)
    w_up = _normal(rng, (experts, INTER, HIDDEN), dtype, 0.06)
    w_down = _normal(rng, (experts, HIDDEN, INTER), dtype, 0.07)
    return w_gate, w_up, w_down


def _choices(rng, tokens, k=K, experts=EXPERTS):
    """Random distinct expert ids (rank order) and weights for `tokens` tokens."""
    ids = np.stack([rng.permutation(experts)[:k] for _ in range(tokens)]).astype(np.int32)
    return jnp.asarray(ids), jnp.asarray(rng.dirichlet(np.ones(k), tokens), jnp.float32)


@functools.cache
def _experts(backend: str):
    return jax.jit(lambda *a: ops.experts(*a, Numerics(backend=backend)))


# -- routing ------------------------------------------------------------------------------------


def _numpy_route(logits: np.ndarray, k: int, renormalize: bool):
    """Softmax in float64, the k largest (a stable sort: among ties the lower index first)."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    ids = np.argsort(-p, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(p, ids, axis=1)
    return ids, top / top.sum(axis=1, keepdims=True) if renormalize else top


@pytest.mark.parametrize("renormalize", [True, False])
def test_routing_matches_numpy(renormalize):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((70, 16)).astype(np.float32) * 3
    logits[:5] = np.round(logits[:5])  # rows with ties among integer logits
    ids, weights = jax.jit(lambda z: moe.route(z, 4, renormalize=renormalize))(logits)
    want_ids, want_weights = _numpy_route(logits, 4, renormalize)
    np.testing.assert_array_equal(np.asarray(ids), want_ids)
    np.testing.assert_allclose(np.asarray(weights), want_weights, rtol=2e-6, atol=1e-7)


def test_tied_router_logits_go_to_the_lower_index():
    """Equal logits give equal probabilities; the k chosen are the largest, and among equals the
    lower expert indices, listed in index order."""
    logits = np.array(
        [
            [0.0] * 8,  # all tied
            [0, 5, 2, 2, 9, 2, 0, 0],  # a three-way tie for the last two places
            [1, 3, 3, 1, 3, 1, 3, 0],  # four tied for the top
            [7, 1, 1, 7, 0, 0, 0, 7],  # three tied for the top, at both ends
        ],
        np.float32,
    )
    want = [[0, 1, 2], [4, 1, 2], [1, 2, 4], [0, 3, 7]]
    num = Numerics(backend="cpu")
    eye = jnp.eye(8, dtype=jnp.float32)  # router weight: logits = x itself
    ids, weights = jax.jit(lambda x: ops.route(x, eye, num, k=3, renormalize=True))(logits)
    np.testing.assert_array_equal(np.asarray(ids), want)
    np.testing.assert_array_equal(np.asarray(ids), _numpy_route(logits, 3, True)[0])
    tied = np.asarray(weights)[[0, 2, 3]]
    assert np.all(tied == tied[:, :1])  # tied experts get bitwise equal weights


def _hf_router(family: str, renormalize: bool, w_router: np.ndarray, k: int):
    import transformers
    from transformers.models.mixtral import modeling_mixtral
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    experts, hidden = w_router.shape
    if family == "mixtral":
        config = transformers.MixtralConfig(hidden_size=hidden, num_local_experts=experts,
                                            num_experts_per_tok=k)  # fmt: skip
        router = modeling_mixtral.MixtralTopKRouter(config)
    else:
        config = transformers.Qwen3MoeConfig(
            hidden_size=hidden, num_experts=experts, num_experts_per_tok=k,
            norm_topk_prob=renormalize,
        )  # fmt: skip
        router = modeling_qwen3_moe.Qwen3MoeTopKRouter(config)
    with torch.no_grad():
        router.weight.copy_(torch.from_numpy(w_router))
    return router


@pytest.mark.parametrize(
    "family,renormalize,k", [("qwen3_moe", True, 8), ("qwen3_moe", False, 8), ("mixtral", True, 2)]
)
def test_routing_matches_hugging_face_routers(family, renormalize, k):
    """`ops.route` (fp32) chooses the experts Qwen3MoeTopKRouter / MixtralTopKRouter choose, with
    their weights (Mixtral always renormalises)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 64)).astype(np.float32)
    w_router = (rng.standard_normal((32, 64)) * 0.3).astype(np.float32)
    ids, weights = jax.jit(
        lambda x, w: ops.route(x, w, Numerics(backend="cpu"), k=k, renormalize=renormalize)
    )(x, w_router)
    with torch.no_grad():
        _, hf_weights, hf_ids = _hf_router(family, renormalize, w_router, k)(torch.from_numpy(x))
    np.testing.assert_array_equal(np.asarray(ids), hf_ids.numpy())
    np.testing.assert_allclose(np.asarray(weights), hf_weights.numpy(), rtol=1e-5, atol=1e-7)


def test_routing_row_is_bitwise_invariant_to_the_batch():
    rng = np.random.default_rng(2)
    w_router = _normal(rng, (60, HIDDEN), jnp.bfloat16, 0.1)  # 60 experts, as Qwen2-MoE
    others, probe = (
        _normal(rng, (70, HIDDEN), jnp.bfloat16),
        _normal(rng, (1, HIDDEN), jnp.bfloat16),
    )
    route = jax.jit(
        lambda x: ops.route(x, w_router, Numerics(backend="cpu"), k=K, renormalize=True)
    )
    alone = route(probe)
    for rows, at in [(33, 32), (70, 41)]:
        ids, weights = route(others[:rows].at[at].set(probe[0]))
        assert_bitwise(ids[at], alone[0][0])
        assert_bitwise(weights[at], alone[1][0])


# -- the experts ----------------------------------------------------------------------------------


def _numpy_moe(x, ids, weights, w_gate, w_up, w_down) -> np.ndarray:
    """float64: every expert on every token (dense), each token's k selected and weighted."""
    x, w_gate, w_up, w_down = (np.asarray(a, np.float64) for a in (x, w_gate, w_up, w_down))
    gate = np.einsum("th,eih->tei", x, w_gate)
    h = gate / (1 + np.exp(-gate)) * np.einsum("th,eih->tei", x, w_up)
    y = np.einsum("tei,ehi->teh", h, w_down)  # [T, E, H]
    picked = np.take_along_axis(y, np.asarray(ids)[:, :, None], axis=1)  # [T, k, H]
    return np.einsum("tkh,tk->th", picked, np.asarray(weights, np.float64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matches_reference_and_a_dense_numpy_moe(dtype, backend):
    rng = np.random.default_rng(3)
    x = _normal(rng, (37, HIDDEN), dtype)
    ids, weights = _choices(rng, 37)
    ws = _experts_weights(rng, dtype)
    out = _experts(backend)(x, ids, weights, *ws)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, moe.reference(x, ids, weights, *ws), dtype)
    assert_close(out, _numpy_moe(x, ids, weights, *ws), dtype)


def test_tpu_kernel_matches_a_dense_numpy_moe_on_a_small_layer():
    """The Mosaic TPU kernel (TPU interpret mode, every check on) at a size it runs quickly:
    one column block and one K block per projection, four tiles."""
    rng = np.random.default_rng(9)
    x = _normal(rng, (8, 128), jnp.float32)
    ids, weights = _choices(rng, 8, k=2, experts=4)
    ws = tuple(_normal(rng, (4, 128, 128), jnp.float32, 0.08) for _ in range(3))
    out = jax.jit(functools.partial(pallas_moe.tpu_kernel, interpret=True))(x, ids, weights, *ws)
    assert_close(out, _numpy_moe(x, ids, weights, *ws), jnp.float32)


@functools.cache
def _dense_experts(backend: str):
    """Every expert's MLP on every row through `ops.matmul` (row-invariant), in `moe`'s dtypes:
    f32[E, T, H] (one expert at a time: `lax.map` over the stacked weights)."""
    num = Numerics(backend=backend)

    def every_expert(x, *ws):
        def mlp(w):
            w_gate, w_up, w_down = w
            h = moe.swiglu(ops.matmul(x, w_gate, num), ops.matmul(x, w_up, num), x.dtype)
            return ops.matmul(h, w_down, num)

        return jax.lax.map(mlp, ws)

    return jax.jit(every_expert)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_row_is_its_experts_dense_mlp_combined_by_rank(dtype, backend):
    """Row t is bitwise: for each rank r, expert ids[t, r]'s dense MLP on x[t] through the
    invariant matmul of the same backend, times weights[t, r] in fp32; the k products summed by
    rank, ((p0 + p1) + p2) + p3, in float32 (numpy: no fused multiply-add); cast to x's dtype."""
    rng = np.random.default_rng(4)
    x = _normal(rng, (45, HIDDEN), dtype)
    ids, weights = _choices(rng, 45)
    ws = _experts_weights(rng, dtype)
    out = _experts(backend)(x, ids, weights, *ws)
    dense = np.asarray(_dense_experts(backend)(x, *ws))  # [E, T, H]
    rows = np.arange(45)
    ids_np, w_np = np.asarray(ids), np.asarray(weights)
    products = [w_np[:, r, None] * dense[ids_np[:, r], rows] for r in range(K)]
    want = products[0]
    for p in products[1:]:
        want = want + p
    assert want.dtype == np.float32
    assert_bitwise(out, jnp.asarray(want).astype(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_is_bitwise_invariant_to_expert_load_and_batch(backend):
    """A token's row alone (each of its experts gets 1 row) and in a batch of 64 where its first
    expert gets 60 more rows (several tiles), or where its batch mates route at random."""
    rng = np.random.default_rng(5)
    dtype = jnp.bfloat16
    ws = _experts_weights(rng, dtype)
    probe = _normal(rng, (1, HIDDEN), dtype)
    probe_ids = jnp.asarray([[3, 0, 5, 6]], jnp.int32)
    probe_w = jnp.asarray([[0.4, 0.3, 0.2, 0.1]], jnp.float32)
    op = _experts(backend)
    alone = op(probe, probe_ids, probe_w, *ws)[0]
    others = _normal(rng, (64, HIDDEN), dtype)
    random_ids, random_w = _choices(rng, 64)
    crowd_ids = random_ids.at[:61, 0].set(3).at[:61, 1:].set(jnp.asarray([1, 2, 4]))  # 3: 61 rows
    cases = [(crowd_ids, random_w, 0), (crowd_ids, random_w, 60), (random_ids, random_w, 17)]
    for ids, w, at in cases:
        x = others.at[at].set(probe[0])
        out = op(x, ids.at[at].set(probe_ids[0]), w.at[at].set(probe_w[0]), *ws)
        assert_bitwise(out[at], alone)


def test_tpu_kernel_on_two_cores(capfd):
    """Two simulated TensorCores share the grid (shuffled): same bits as one, and no races."""
    rng = np.random.default_rng(8)
    x = _normal(rng, (40, HIDDEN), jnp.bfloat16)
    ids, weights = _choices(rng, 40)
    ws = _experts_weights(rng, jnp.bfloat16)
    two = functools.partial(pallas_moe.tpu_kernel, interpret=TPU_INTERPRET_2_CORES)
    assert_bitwise(
        jax.jit(two)(x, ids, weights, *ws), _experts("tpu_interpret")(x, ids, weights, *ws)
    )
    assert_no_races(capfd)


def test_grouping_pads_each_expert_to_whole_tiles():
    """The grouped buffer: each expert's rows (token order) start at a tile boundary, padding
    rows hold no token, and the static size bounds any routing."""
    ids = jnp.asarray([[2, 0], [2, 1], [0, 2]], jnp.int32)
    g = jax.jit(moe.group, static_argnums=(1, 2))(ids, 4, 2)
    # expert 0: assignments (0,1), (2,0); expert 1: (1,1); expert 2: (0,0), (1,0), (2,1)
    np.testing.assert_array_equal(np.asarray(g.dest), [[4, 0], [5, 2], [1, 6]])
    np.testing.assert_array_equal(np.asarray(g.row_token)[:8], [0, 2, 1, 3, 0, 1, 2, 3])
    np.testing.assert_array_equal(np.asarray(g.tile_expert), [0, 1, 2, 2, 2, 2])  # unused: last
    assert int(g.num_used[0]) == 4 and g.tile_expert.size == moe.num_tiles(6, 4, 2) == 6
    rng = np.random.default_rng(6)
    for tokens, k, experts, tile in [
        (1, 8, 128, 16),
        (64, 8, 128, 16),
        (512, 8, 128, 32),
        (9, 2, 8, 4),
    ]:
        bound = moe.num_tiles(tokens * k, experts, tile)
        for skew in (False, True):  # random, and as many experts as possible with a partial tile
            ids = np.stack([rng.permutation(experts)[:k] for _ in range(tokens)])
            if skew:
                ids = (np.arange(tokens * k) % experts).reshape(tokens, k)
            counts = np.bincount(ids.ravel(), minlength=experts)
            assert np.sum(-(-counts // tile)) <= bound


def _torch_moe(x, w_router, w_gate, w_up, w_down, k):
    """Qwen3-MoE's sparse block in float64 torch: router, softmax, top-k, renormalised, experts."""
    probs = torch.softmax(x @ w_router.T, dim=-1)
    top, ids = torch.topk(probs, k, dim=-1)
    top = top / top.sum(dim=-1, keepdim=True)
    out = torch.zeros_like(x)
    for r in range(k):
        e = ids[:, r]
        gate = torch.einsum("th,tih->ti", x, w_gate[e])
        h = torch.nn.functional.silu(gate) * torch.einsum("th,tih->ti", x, w_up[e])
        out = out + top[:, r, None] * torch.einsum("ti,thi->th", h, w_down[e])
    return out


@pytest.mark.parametrize("backend", ["cpu", "pallas_interpret"])
def test_gradient_matches_torch_autograd(backend):
    """d/d(x, router, experts) of sum(c * MoE(x)) against torch autograd in float64 through the
    whole sparse block written here (the selection is not differentiated, the gate weights are)."""
    rng = np.random.default_rng(7)
    num = Numerics(backend=backend)
    x = _normal(rng, (9, HIDDEN), jnp.float32)
    w_router = _normal(rng, (EXPERTS, HIDDEN), jnp.float32, 0.1)
    ws = _experts_weights(rng, jnp.float32)
    c = _normal(rng, (9, HIDDEN), jnp.float32)

    def loss(x, w_router, *ws):
        ids, weights = ops.route(x, w_router, num, k=K, renormalize=True)
        return jnp.sum(ops.experts(x, ids, weights, *ws, num) * c)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(x, w_router, *ws)
    leaves = [torch.tensor(np.asarray(a), dtype=torch.float64, requires_grad=True)
              for a in (x, w_router, *ws)]  # fmt: skip
    (_torch_moe(*leaves, K) * torch.tensor(np.asarray(c), dtype=torch.float64)).sum().backward()
    for got, leaf in zip(grads, leaves):
        assert_close(got, leaf.grad.numpy(), jnp.float32)


def test_rejects_bad_shapes():
    x = jnp.zeros((4, HIDDEN))
    ids, w = jnp.zeros((4, 2), jnp.int32), jnp.zeros((4, 2))
    ws = _experts_weights(np.random.default_rng(0), jnp.float32)
    num = Numerics(backend="cpu")
    with pytest.raises(ValueError, match=r"w_down\(8, 192, 256\)"):
        ops.experts(x, ids, w, ws[0], ws[1], jnp.swapaxes(ws[2], 1, 2), num)
    with pytest.raises(ValueError, match=r"weights\(4, 3\)"):
        ops.experts(x, ids, jnp.zeros((4, 3)), *ws, num)
    with pytest.raises(ValueError, match="expert_ids must be integers"):
        ops.experts(x, w, w, *ws, num)
    with pytest.raises(ValueError, match="k=9"):
        moe.route(jnp.zeros((4, 8)), 9, renormalize=True)


# (tokens, hidden, moe_intermediate, experts, k) of a 512-token bf16 step: Qwen3-30B-A3B's sparse
# layer (128 experts of 768, top-8) and Mixtral-8x7B's (8 experts of 14336, top-2).
QWEN3_30B_A3B = (512, 2048, 768, 128, 8)
MIXTRAL_8X7B = (512, 4096, 14336, 8, 2)


def _abstract_layer(tokens, hidden, inter, experts, k):
    s, bf16 = jax.ShapeDtypeStruct, jnp.bfloat16
    return (s((tokens, hidden), bf16), s((tokens, k), jnp.int32), s((tokens, k), jnp.float32),
            s((experts, inter, hidden), bf16), s((experts, inter, hidden), bf16),
            s((experts, hidden, inter), bf16))  # fmt: skip


@pytest.mark.parametrize("platform,target", [("cuda", "triton"), ("tpu", "mosaic_tpu")])
def test_kernel_lowers_for_gpu_and_tpu_at_qwen3_30b_a3b(platform, target):
    experts = lambda *a: ops.experts(*a, Numerics(backend="pallas"))  # noqa: E731
    calls = kernel_calls(lower_for(platform, experts, *_abstract_layer(*QWEN3_30B_A3B)))
    assert calls[target] == 3 and sum(calls.values()) == 3  # gate, up, down; nothing else


@pytest.mark.parametrize(
    "layer", [QWEN3_30B_A3B, MIXTRAL_8X7B], ids=["qwen3-30b-a3b", "mixtral-8x7b"]
)
def test_tpu_kernel_fits_vmem(layer):
    """The expert kernel's VMEM is a few blocks whatever K is (BUILD.md's table)."""
    tokens, _, _, experts, k = layer
    prints = tpu_vmem.footprints(pallas_moe.tpu_kernel, *_abstract_layer(*layer))
    assert [fp.kernel for fp in prints] == ["tpu_grouped_matmul"] * 3
    for fp in prints:
        assert not tpu_vmem.block_rule_violations(fp)
        assert fp.vmem_bytes < tpu_vmem.MiB and fp.smem_bytes < tpu_vmem.MiB // 16
        assert fp.grid[1] == moe.num_tiles(tokens * k, experts, pallas_moe.TILE)
