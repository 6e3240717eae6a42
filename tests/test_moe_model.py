"""Mixture-of-experts models: Qwen3-MoE, Mixtral and Qwen2-MoE checkpoints written by transformers
agree with it (fp32, prompts of 100+ tokens, greedy continuations identical); on `tiny-moe` the
rollout is bitwise `score` and `rl.token_logprobs`, and a request's output does not depend on its
batch mates (60 rows sharing its experts), chunking, page size, prefix caching or preemption."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jengine
from jengine import Engine, EngineConfig, Model, ModelConfig, SamplingParams, init_params, rl
from jengine.models.loading import load_model
from jengine.models.transformer import (
    layer_period,
    leaf_layers,
    param_shapes,
    stack_layers,
    unstack_layers,  # fmt: skip
)
from tests.conftest import random_prompts


def bits(x) -> np.ndarray:
    return np.asarray(x, np.float32).view(np.uint32)


def assert_bitwise(a, b):
    assert np.array_equal(bits(a), bits(b))


# -- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_experts=8, num_experts_per_tok=0, moe_intermediate_size=4), "num_experts_per_tok=0"),
        (dict(num_experts=8, num_experts_per_tok=9, moe_intermediate_size=4), "num_experts_per_tok=9"),
        (dict(num_experts=8, num_experts_per_tok=2), "moe_intermediate_size=0"),
        (dict(num_experts_per_tok=2), "num_experts=0"),
        (dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=4, mlp_only_layers=(5,)),
         "mlp_only_layers contains 5"),
        (dict(num_experts=-1), "num_experts=-1"),
        (dict(decoder_sparse_step=0), "decoder_sparse_step=0"),
    ],
)
def test_bad_moe_fields_are_named(kwargs, message):
    base = ModelConfig.named("tiny").to_dict()
    with pytest.raises((ValueError, TypeError), match=message):
        ModelConfig.from_dict({**base, **kwargs})


def test_sparse_layers_follow_qwens_rule_and_the_scan_period_covers_them():
    c = ModelConfig.named("tiny").replace(num_layers=7, num_experts=8, num_experts_per_tok=2,
                                          moe_intermediate_size=4, decoder_sparse_step=2)  # fmt: skip
    assert c.sparse_layers == (1, 3, 5) and layer_period(c) == 2
    c = c.replace(decoder_sparse_step=1, mlp_only_layers=(1,))
    assert c.sparse_layers == (0, 2, 3, 4, 5, 6) and layer_period(c) == 6  # layer 6 is a 0
    shapes = param_shapes(c)["layers"]
    assert shapes["w_up"] == (1, 384, 128) and shapes["experts_up"] == (6, 8, 4, 128)
    assert shapes["router"] == (6, 8, 128) and shapes["wq"][0] == 7
    assert leaf_layers(c, "w_down") == (1,) and leaf_layers(c, "experts_down") == c.sparse_layers


def test_shipped_moe_configs():
    q = ModelConfig.named("qwen3-30b-a3b")
    assert (q.num_experts, q.num_experts_per_tok, q.moe_intermediate_size) == (128, 8, 768)
    assert q.norm_topk_prob and q.qk_norm and len(q.sparse_layers) == 48
    m = ModelConfig.named("mixtral-8x7b")
    assert (m.num_experts, m.num_experts_per_tok, m.moe_intermediate_size) == (8, 2, 14336)
    assert ModelConfig.named("tiny-moe").num_experts >= 8


# -- transformers parity ----------------------------------------------------------------------

COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=512)  # fmt: skip
FAMILIES = {
    # top-2 renormalised, layer 1 dense (mlp_only_layers): a scan period of 3 kinds
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **COMMON, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1]),
    # top-4 of 8, Mixtral renormalises always
    "mixtral": lambda: transformers.MixtralConfig(
        **COMMON, intermediate_size=32, num_local_experts=8, num_experts_per_tok=4),
    # top-4 not renormalised, a shared expert with its sigmoid gate, biased q/k/v
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **COMMON, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
        num_experts_per_tok=4, shared_expert_intermediate_size=48, norm_topk_prob=False),
}  # fmt: skip


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (checkpoint dir, the fp32 torch model it holds)."""
    out = {}
    for family, make in FAMILIES.items():
        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_config(make(), attn_implementation="eager")
        with torch.no_grad():  # weights large enough that routing is decisive
            for name, p in hf.named_parameters():
                p.copy_((1.0 + 0.1 * torch.randn_like(p)) if "norm" in name else
                        (0.5 if "gate.weight" in name else 0.1) * torch.randn_like(p))
        directory = str(tmp_path_factory.mktemp(family))
        hf.eval().save_pretrained(directory)
        out[family] = directory, hf
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_checkpoint_matches_transformers(checkpoints, family):
    directory, hf = checkpoints[family]
    model = load_model(directory)
    assert model.config.num_experts == 8 and model.params["layers"]["experts_gate"].shape[1] == 8
    rng = np.random.default_rng(2)
    prompt = list(map(int, rng.integers(0, 256, 110)))
    completion = list(map(int, rng.integers(0, 256, 10)))
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + completion])).logits[0].float()
    want = torch.log_softmax(logits, -1)[torch.arange(len(prompt) - 1, 119), torch.tensor(completion)]
    got = jengine.score(model, prompt, completion)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)
    # greedy continuation: transformers' argmax token by token
    engine = Engine(model, EngineConfig(max_model_len=160, max_num_seqs=1, page_size=16))
    ours = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                             min_new_tokens=12)[0, len(prompt):]  # fmt: skip
    assert ours[0].token_ids == theirs.tolist()


def test_stack_unstack_round_trip_with_dense_and_sparse_layers(checkpoints):
    model = load_model(checkpoints["qwen3_moe"][0])
    per_layer = unstack_layers(model.params, model.config)["layers"]
    assert "w_up" in per_layer[1] and "router" not in per_layer[1] and "router" in per_layer[2]
    again = stack_layers({**model.params, "layers": per_layer})
    for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(model.params)):
        assert_bitwise(a, b)
    with pytest.raises(ValueError, match="pass the model's config"):
        unstack_layers(model.params)


# -- exactness on tiny-moe --------------------------------------------------------------------

BASE = dict(max_model_len=160, max_num_seqs=4, max_num_batched_tokens=32, page_size=8,
            num_pages=96)  # fmt: skip
PARAMS = [
    SamplingParams(temperature=1.0, max_tokens=8, seed=1),
    SamplingParams(temperature=0.7, top_k=40, max_tokens=6, seed=2),
    SamplingParams(temperature=0.0, max_tokens=7, seed=3),
    SamplingParams(temperature=0.9, top_p=0.9, max_tokens=5, seed=4),
]


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig.named("tiny-moe")
    params = init_params(cfg, seed=0)
    # a router with weight enough that tokens prefer some experts strongly
    params["layers"]["router"] = params["layers"]["router"] * 20
    return Model(cfg, params)


@pytest.fixture(scope="module")
def workload():
    return random_prompts(4, 512, lo=20, hi=60, seed=5), PARAMS


def run(model, prompts, params, **cfg):
    engine = Engine(model, EngineConfig(**{**BASE, **cfg}))
    outs = engine.generate(prompts, params)
    engine.check_invariants()
    return outs, engine


@pytest.fixture(scope="module")
def alone(tiny, workload):
    prompts, params = workload
    return [run(tiny, [p], [sp], max_num_batched_tokens=16)[0][0] for p, sp in zip(prompts, params)]


def test_rollout_is_bitwise_score_and_token_logprobs(tiny, workload, alone):
    prompts, params = workload
    outs, _ = run(tiny, prompts, params)
    scored = jengine.score(tiny, prompts, [o.token_ids for o in outs], params)
    for a, b, s in zip(alone, outs, scored):
        assert a.token_ids == b.token_ids
        assert_bitwise(a.logprobs, b.logprobs)
        assert_bitwise(s, b.logprobs)
    seqs = [p + o.token_ids for p, o in zip(prompts, outs)]
    width = max(map(len, seqs))
    tokens = jnp.asarray([s + [0] * (width - len(s)) for s in seqs], jnp.int32)
    prompt_lens = jnp.asarray([len(p) for p in prompts], jnp.int32)
    completion_lens = jnp.asarray([len(o.token_ids) for o in outs], jnp.int32)

    def values(p):
        return rl.token_logprobs(p, tiny.config, tokens, prompt_lens, completion_lens,
                                 sampling_params=params)  # fmt: skip

    got = np.asarray(values(tiny.params))
    for row, (prompt, out) in enumerate(zip(prompts, outs)):
        start = len(prompt) - 1
        assert_bitwise(got[row, start : start + len(out.token_ids)], out.logprobs)
    grads = jax.grad(lambda p: jnp.sum(values(p)))(tiny.params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
    assert float(jnp.abs(grads["layers"]["router"]).sum()) > 0  # the gate weights are trained
    assert float(jnp.abs(grads["layers"]["experts_down"]).sum()) > 0


def test_a_request_is_bitwise_alone_among_60_rows_on_its_experts(tiny, workload, alone):
    """The same request next to 15 copies of one 60-token prompt (so the experts it uses receive
    tens of rows in a step instead of a few) gives its alone bits."""
    prompts, params = workload
    crowd = random_prompts(1, 512, lo=60, hi=61, seed=11)[0]
    outs, _ = run(tiny, [prompts[0]] + [crowd] * 15, [params[0]] + [SamplingParams(max_tokens=2)] * 15,
                  max_num_seqs=16, max_num_batched_tokens=128, enable_prefix_caching=False)
    assert outs[0].token_ids == alone[0].token_ids
    assert_bitwise(outs[0].logprobs, alone[0].logprobs)


@pytest.mark.parametrize(
    "cfg",
    [
        {"max_num_seqs": 3, "max_num_batched_tokens": 24},
        {"min_token_bucket": 2, "max_num_batched_tokens": 24},
        {"enable_prefix_caching": False, "page_size": 32, "num_pages": 24},
        {"page_size": 4, "num_pages": 24, "max_num_batched_tokens": 16},  # preempts
    ],
    ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()),
)
def test_output_independent_of_batching_pages_and_preemption(tiny, workload, alone, cfg):
    prompts, params = workload
    outs, engine = run(tiny, prompts, params, **cfg)
    assert (engine.stats["preemptions"] > 0) == (cfg.get("page_size") == 4)
    for a, b in zip(alone, outs):
        assert a.token_ids == b.token_ids
        assert_bitwise(a.logprobs, b.logprobs)


def test_prefix_cache_hits_change_nothing(tiny):
    prefix = random_prompts(1, 512, lo=40, hi=41, seed=9)[0]
    prompts = [prefix + [5 + i, 7, 9] for i in range(3)]
    params = [SamplingParams(max_tokens=6, seed=i) for i in range(3)]
    engine = Engine(tiny, EngineConfig(**BASE))
    warm = engine.generate(prompts[:1], params[:1]) + engine.generate(prompts[1:], params[1:])
    assert engine.stats["prefix_cache_hit_tokens"] >= 2 * 40
    cold, _ = run(tiny, prompts, params, enable_prefix_caching=False)
    for a, b in zip(cold, warm):
        assert a.token_ids == b.token_ids
        assert_bitwise(a.logprobs, b.logprobs)


def test_orbax_round_trip(tiny, tmp_path):
    from jengine.models.loading import save_model

    save_model(tiny, str(tmp_path / "ckpt"))
    back = load_model(str(tmp_path / "ckpt"))
    assert back.config == tiny.config
    for a, b in zip(jax.tree_util.tree_leaves(back.params), jax.tree_util.tree_leaves(tiny.params)):
        assert_bitwise(a, b)


def test_routed_experts_recorded_by_the_engine_are_the_scorers(tiny, workload):
    """`return_routed_experts` puts i32[tokens, sparse layers, k] on each output; they equal the
    routing `rl.token_logprobs(return_routing=True)` used for every completion token, and
    `rl.mismatch_metrics` counts 0 routing mismatches (and counts a changed expert)."""
    prompts, params = workload
    outs, _ = run(tiny, prompts, params, return_routed_experts=True)
    c = tiny.config
    packed = rl.pack(prompts, [o.token_ids for o in outs],
                     rollout_logprobs=[o.logprobs for o in outs])  # fmt: skip
    values, routing = rl.token_logprobs(
        tiny.params, c, packed["tokens"], packed["prompt_lens"], packed["completion_lens"],
        sampling_params=params, return_routing=True)  # fmt: skip
    routing = np.asarray(routing)
    assert routing.shape[2:] == (len(c.sparse_layers), c.num_experts_per_tok)
    rollout = np.zeros_like(routing) - 1
    for b, (p, o) in enumerate(zip(prompts, outs)):
        assert o.routed_experts.dtype == np.int32
        assert o.routed_experts.shape == (len(o.token_ids), len(c.sparse_layers), 2)
        assert (np.diff(np.sort(o.routed_experts, -1), axis=-1) > 0).all()  # k distinct experts
        np.testing.assert_array_equal(o.routed_experts, routing[b, len(p) - 1 : len(p) - 1 + len(o.token_ids)])
        rollout[b, len(p) - 1 : len(p) - 1 + len(o.token_ids)] = o.routed_experts
    mask = rl.completion_mask(packed["prompt_lens"], packed["completion_lens"], packed["tokens"].shape[1])
    m = rl.to_host(rl.mismatch_metrics(values, packed["logprobs"], mask, routing_new=routing,
                                       routing_old=rollout))  # fmt: skip
    assert m["routing_mismatches"] == 0 and m["bitwise_equal"] == m["num_tokens"]
    rollout[0, len(prompts[0]) - 1, 0, 1] += 1
    assert int(rl.routing_mismatches(routing, rollout, mask)) == 1
    plain, engine = run(tiny, prompts[:1], params[:1])
    assert plain[0].routed_experts is None
    from jengine.diagnostics import format_parity_report, parity_report

    report = parity_report(tiny, outs, prompts, params, numerics=engine.numerics)
    assert report["routing_mismatches"] == 0 and "routing_mismatches" in format_parity_report(report)
    outs[1].routed_experts[0, 0, 0] ^= 1
    assert parity_report(tiny, outs, prompts, params, numerics=engine.numerics)["routing_mismatches"] == 1


EP_CHECK = """
import json
import numpy as np
import jax
from jengine import Engine, EngineConfig, Model, ModelConfig, SamplingParams, init_params, rl
from jengine.sharding import make_mesh
from tests.conftest import random_prompts
cfg = ModelConfig.named("tiny-moe")
params = init_params(cfg, seed=0)
params["layers"]["router"] = params["layers"]["router"] * 20
model = Model(cfg, params)
prompts = random_prompts(4, 512, lo=17, hi=60, seed=3)
sp = [SamplingParams(temperature=0.8, max_tokens=6, seed=i) for i in range(4)]
base = dict(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32, page_size=8,
            column_blocks=4, return_routed_experts=True)
outs = {}
for name, kw in {"one_device": {}, "ep2": dict(tensor_parallel_size=2),
                 "ep4": dict(tensor_parallel_size=4),
                 "ep2xdp2": dict(tensor_parallel_size=2, data_parallel_size=2)}.items():
    engine = Engine(model, EngineConfig(**base, **kw))
    outs[name] = [(o.token_ids, np.asarray(o.logprobs, np.float32).view(np.uint32).tolist(),
                   o.routed_experts.tolist()) for o in engine.generate(prompts, sp)]
    if name == "ep2":
        shards = engine.runner.params["layers"]["experts_up"].addressable_shards
        experts_per_device = shards[0].data.shape[1]
packed = rl.pack(prompts, [o[0] for o in outs["one_device"]])
lp = {}
for tp in (1, 4):
    lp[tp] = np.asarray(rl.token_logprobs(
        params, cfg, packed["tokens"], packed["prompt_lens"], packed["completion_lens"],
        sampling_params=sp, numerics=engine.numerics.replace(column_blocks=4),
        mesh=make_mesh(tp) if tp > 1 else None), np.float32).view(np.uint32).tolist()
print(json.dumps({"equal": {k: v == outs["one_device"] for k, v in outs.items()},
                  "scorer_equal": lp[1] == lp[4], "experts_per_device": experts_per_device,
                  "tokens": len(outs["ep2"][0][0])}))
"""


def test_shared_expert_rollout_is_bitwise_score_and_alone(checkpoints):
    """Qwen2-MoE (a shared expert gated by a sigmoid, added to the routed experts' combine, and
    top-4 without renormalisation): a mixed batch's rollout logprobs are bitwise the scorer's and
    each request's run alone with other chunk sizes."""
    model = load_model(checkpoints["qwen2_moe"][0])
    assert model.config.shared_expert_intermediate_size == 48
    prompts, params = random_prompts(3, 256, lo=20, hi=50, seed=9), PARAMS[:3]
    outs, _ = run(model, prompts, params)
    scored = jengine.score(model, prompts, [o.token_ids for o in outs], params)
    for prompt, sp, out, s in zip(prompts, params, outs, scored):
        alone = run(model, [prompt], [sp], max_num_batched_tokens=16)[0][0]
        assert alone.token_ids == out.token_ids
        assert_bitwise(alone.logprobs, out.logprobs)
        assert_bitwise(s, out.logprobs)


def test_expert_parallel_is_bitwise_one_device():
    """Experts split over 2 and 4 forced CPU devices (and 2 x 2 data parallel) give the tokens,
    logprob bits and routed experts of one device; the scorer over 4 devices those of one."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"
    proc = subprocess.run([sys.executable, "-c", EP_CHECK], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(report["equal"].values()) and report["scorer_equal"], report
    assert report["experts_per_device"] == 4 and report["tokens"] == 6


def test_score_row_is_bitwise_alone_and_in_a_crowd_on_its_experts(tiny):
    """Quick tier: one sequence scored alone and beside 15 copies of a 60-token sequence (its
    experts then receive tens of rows where they had a few) has the same bits."""
    prompt, completion = random_prompts(2, 512, lo=30, hi=31, seed=4)
    crowd = random_prompts(1, 512, lo=60, hi=61, seed=11)[0]
    alone = jengine.score(tiny, prompt, completion)
    crowded = jengine.score(tiny, [prompt] + [crowd[:30]] * 15, [completion] + [crowd[30:60]] * 15)
    assert_bitwise(crowded[0], alone)


def write_moe_gguf(path, model: Model, arch: str, per_expert: bool = False) -> None:
    """`model` as llama.cpp's converter lays a mixture-of-experts model out: stacked expert tensors
    (`blk.{i}.ffn_{gate,up,down}_exps`), or with `per_expert` one tensor per expert as early
    Mixtral GGUFs hold them (`blk.{i}.ffn_{gate,up,down}.{e}`), the router as `ffn_gate_inp`, the
    expert metadata; q/k rows permuted for the llama architecture."""
    import gguf

    from jengine.models.loading import _GGUF_LAYER, _GGUF_TOP
    from tests.test_gguf import llama_cpp_permute

    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in dict(block_count=c.num_layers, context_length=c.max_position_embeddings,
                           embedding_length=c.hidden_size, feed_forward_length=c.intermediate_size,
                           head_count=c.num_heads, head_count_kv=c.num_kv_heads,
                           rope_freq_base=c.rope_theta, layer_norm_rms_eps=c.rms_norm_eps,
                           key_length=c.head_dim, value_length=c.head_dim,
                           vocab_size=c.vocab_size, expert_count=c.num_experts,
                           expert_used_count=c.num_experts_per_tok).items():  # fmt: skip
        getattr(w, f"add_{key}")(value)
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    params = unstack_layers(model.params, c)
    for name, value in params.items():
        if name != "layers":
            w.add_tensor(_GGUF_TOP[name], np.asarray(value, np.float32))
    for i, layer in enumerate(params["layers"]):
        for name, value in layer.items():
            data = np.asarray(value, np.float32)
            if arch == "llama" and name in ("wq", "wk"):
                data = llama_cpp_permute(data, c.num_heads if name == "wq" else c.num_kv_heads)
            if per_expert and name.startswith("experts_"):
                for e, expert in enumerate(data):
                    w.add_tensor(f"blk.{i}.ffn_{name.removeprefix('experts_')}.{e}.weight", expert)
                continue
            w.add_tensor(f"blk.{i}.{_GGUF_LAYER[name]}", data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("family, arch, per_expert", [("qwen3_moe", "qwen3moe", False),
                                                      ("mixtral", "llama", False),
                                                      ("mixtral", "llama", True)])  # fmt: skip
def test_gguf_with_stacked_experts_loads_the_checkpoints_params(checkpoints, tmp_path, family, arch,
                                                                per_expert):  # fmt: skip
    """A qwen3moe GGUF and a llama GGUF with experts (Mixtral), stacked or one tensor per expert
    (early Mixtral GGUFs), load to the params and expert config of the safetensors they were
    written from."""
    hf = load_model(checkpoints[family][0])
    path = tmp_path / "model.gguf"
    write_moe_gguf(path, hf, arch, per_expert)
    got = load_model(str(path))
    fields = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
              "qk_norm", "num_layers", "head_dim", "sparse_layers")  # fmt: skip
    assert {f: getattr(got.config, f) for f in fields} == {f: getattr(hf.config, f) for f in fields}
    assert jax.tree_util.tree_structure(got.params) == jax.tree_util.tree_structure(hf.params)
    for a, b in zip(jax.tree_util.tree_leaves(got.params), jax.tree_util.tree_leaves(hf.params)):
        assert_bitwise(a, b)


def test_tied_router_logits_route_to_the_lower_expert(tiny):
    """Experts 3 and 5 with identical router rows tie on every token: wherever 5 is chosen, 3 is
    chosen at an earlier rank, and 3 is chosen somewhere (the tie reaches the selection)."""
    layers = dict(tiny.params["layers"])
    layers["router"] = layers["router"].at[:, 5].set(layers["router"][:, 3])
    params = {**tiny.params, "layers": layers}
    tokens = np.asarray(random_prompts(4, 512, lo=64, hi=65, seed=13), np.int32)
    _, routing = rl.token_logprobs(params, tiny.config, tokens, 1, return_routing=True)
    routing = np.asarray(routing).reshape(-1, tiny.config.num_experts_per_tok)
    has3, has5 = (routing == 3).any(-1), (routing == 5).any(-1)
    assert has3.sum() > 0 and np.array_equal(has5, has5 & has3)
    rank3, rank5 = (routing == 3).argmax(-1), (routing == 5).argmax(-1)
    assert (rank3[has5] < rank5[has5]).all()
