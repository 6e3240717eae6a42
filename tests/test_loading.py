"""Weight loading: HF safetensors parity with transformers, orbax round trips, sharded placement,
and an error naming the file and tensor for every way a checkpoint can be broken."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import torch
import transformers

from jengine import SamplingParams, score
from benchmarks.bench import peak_host_bytes_while_loading
from jengine.models.loading import CheckpointError, load_model, save_model
from jengine.models.transformer import unstack_layers

VOCAB = 256
PROMPT = [5, 17, 200, 3, 99]
COMPLETION = [42, 7, 255, 0, 128, 64, 31, 8, 150, 77, 12]

COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "dtype": "float32",
}
FAMILIES = {
    # Llama-3 RoPE scaling with a short original context so the scaled and smoothed bands both
    # hit head_dim=16's frequencies; untied head.
    "llama": (
        transformers.LlamaConfig,
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            "tie_word_embeddings": False,
        },
    ),
    # Qwen2: q/k/v biases; tied head.
    "qwen2": (transformers.Qwen2Config, {"tie_word_embeddings": True, "rope_theta": 1e6}),
    # Qwen3: per-head q/k RMSNorm and head_dim (32) != hidden / heads (16); untied head.
    "qwen3": (transformers.Qwen3Config, {"head_dim": 32, "tie_word_embeddings": False}),
}


def write_hf_checkpoint(family: str, directory, *, seed: int = 0) -> torch.nn.Module:
    """A tiny seeded random HF model (vocab 256, hidden 64, 2 layers, fp32) saved to `directory`."""
    config_class, extra = FAMILIES[family]
    config = config_class(**COMMON, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # non-trivial norms and biases, so a mis-mapped tensor shows
        for name, p in model.named_parameters():
            p.copy_(
                1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p)
            )
    model.eval()
    model.save_pretrained(directory)
    return model


def hf_logprobs(model, prompt, completion, temperature: float) -> np.ndarray:
    """transformers' fp32 log_softmax(logits / T), gathered at the completion tokens."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    return logprobs[torch.arange(len(completion)), torch.tensor(completion)].numpy()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (checkpoint dir, the torch model it holds)."""
    out = {}
    for family in FAMILIES:
        directory = str(tmp_path_factory.mktemp(family))
        out[family] = (directory, write_hf_checkpoint(family, directory))
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_parity(checkpoints, family):
    directory, hf_model = checkpoints[family]
    model = load_model(directory)
    assert model.config.dtype == "float32"
    assert model.config.tie_word_embeddings == (family == "qwen2")
    assert (model.config.rope_scaling is not None) == (family == "llama")
    assert model.config.rope_theta == (1e6 if family == "qwen2" else 10000.0)
    assert ("lm_head" in model.params) == (family != "qwen2")
    for temperature in (1.0, 0.7):
        ours = score(model, PROMPT, COMPLETION, SamplingParams(temperature=temperature))
        ref = hf_logprobs(hf_model, PROMPT, COMPLETION, temperature)
        np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def leaves_equal(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b) and all(
        x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)
    )


def test_sharded_safetensors_load_identically(checkpoints, tmp_path):
    directory, hf_model = checkpoints["qwen3"]
    hf_model.save_pretrained(tmp_path, max_shard_size="60KB")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 2
    assert leaves_equal(load_model(str(tmp_path)).params, load_model(directory).params)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_orbax_round_trip_is_bitwise(checkpoints, tmp_path, dtype):
    model = load_model(checkpoints["qwen2"][0], dtype=dtype)
    save_model(model, tmp_path / "ckpt")
    restored = load_model(str(tmp_path / "ckpt"))
    assert restored.config == model.config
    assert leaves_equal(restored.params, model.params)
    as_bf16 = load_model(str(tmp_path / "ckpt"), dtype="bfloat16")  # orbax casts on restore
    cast = jax.tree_util.tree_map(lambda x: x.astype("bfloat16"), model.params)
    assert as_bf16.config.dtype == "bfloat16" and leaves_equal(as_bf16.params, cast)


def test_checkpoint_without_the_current_format_version_is_refused(checkpoints, tmp_path):
    """Checkpoints from before the [out, in] layout carry no version: their square matrices
    would load transposed without a shape error, so loading refuses them."""
    model = load_model(checkpoints["qwen2"][0])
    save_model(model, tmp_path / "ckpt")
    marker = tmp_path / "ckpt" / "jengine_checkpoint.json"
    assert json.loads(marker.read_text())["format_version"] == 3
    marker.write_text(json.dumps({"format_version": 1}))
    with pytest.raises(CheckpointError, match="format version 1"):
        load_model(str(tmp_path / "ckpt"))
    marker.unlink()
    with pytest.raises(CheckpointError, match="format version None"):
        load_model(str(tmp_path / "ckpt"))


def test_format_2_checkpoints_with_per_layer_lists_load_stacked(checkpoints, tmp_path):
    """Format 2 saved `layers` as a list of per-layer dicts; it loads into the stacked layout,
    bit for bit, and straight into a sharding."""
    import orbax.checkpoint as ocp

    model = load_model(checkpoints["qwen2"][0])
    save_model(model, tmp_path / "ckpt")
    with ocp.StandardCheckpointer() as ckptr:  # rewrite the params as format 2 stored them
        ckptr.save(tmp_path / "ckpt" / "params", unstack_layers(model.params), force=True)
    marker = tmp_path / "ckpt" / "jengine_checkpoint.json"
    marker.write_text(json.dumps({"format_version": 2, "matrix_layout": "[out, in]"}))
    restored = load_model(str(tmp_path / "ckpt"))
    assert restored.params["layers"]["wq"].shape[0] == model.config.num_layers
    assert leaves_equal(restored.params, model.params)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    placed = load_model(str(tmp_path / "ckpt"), shardings=lambda path, shape: device)
    assert leaves_equal(placed.params, model.params)


def test_bfloat16_loading(checkpoints, tmp_path):
    directory, hf_model = checkpoints["llama"]
    fp32 = load_model(directory)
    bf16 = load_model(directory, dtype="bfloat16")
    assert bf16.config.dtype == "bfloat16"
    assert {x.dtype.name for x in jax.tree_util.tree_leaves(bf16.params)} == {"bfloat16"}
    cast = jax.tree_util.tree_map(lambda x: x.astype("bfloat16"), fp32.params)
    assert leaves_equal(bf16.params, cast)  # RNE rounding, as torch's .to(bfloat16)
    # A bf16 checkpoint keeps its dtype and torch's bits.
    hf_model.to(torch.bfloat16).save_pretrained(tmp_path)
    hf_model.to(torch.float32)
    stored = load_model(str(tmp_path))
    assert stored.config.dtype == "bfloat16"
    assert leaves_equal(stored.params, cast)


def test_config_file_and_named_config_random_init():
    from jengine.config import CONFIGS_DIR

    tiny = load_model("tiny", dtype="bfloat16", seed=3)
    assert tiny.config.name == "tiny" and tiny.params["embed"].dtype.name == "bfloat16"
    from_file = load_model(os.path.join(CONFIGS_DIR, "tiny.json"), dtype="bfloat16", seed=3)
    assert from_file.config == tiny.config and leaves_equal(from_file.params, tiny.params)
    with pytest.raises(ValueError, match="no shipped config named 'nope'"):
        load_model("nope")


def test_shardings_on_one_device(checkpoints):
    directory = checkpoints["llama"][0]
    device = jax.devices()[0]
    seen = []

    def shardings(path, shape):
        seen.append(path)
        return jax.sharding.SingleDeviceSharding(device)

    model = load_model(directory, shardings=shardings)
    assert "layers.wq" in seen and "lm_head" in seen
    assert leaves_equal(model.params, load_model(directory).params)
    as_tree = jax.tree_util.tree_map(lambda x: x.sharding, model.params)
    assert leaves_equal(load_model(directory, shardings=as_tree).params, model.params)


def test_shardings_on_eight_cpu_devices(checkpoints, tmp_path):
    directory = checkpoints["llama"][0]
    script = textwrap.dedent(f"""
        import jax, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from jengine.models.loading import load_model, save_model
        assert jax.device_count() == 8
        mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
        def shardings(path, shape):  # [out, in]: split q/k/v/gate/up/embed by rows, o/down by columns
            leaf, layer = path.split(".")[-1], (None,) * path.startswith("layers.")
            if leaf in ("wq", "wk", "wv", "w_gate", "w_up", "embed", "lm_head"):
                return NamedSharding(mesh, P(*layer, "model", None))
            if leaf in ("wo", "w_down"):
                return NamedSharding(mesh, P(*layer, None, "model"))
            return NamedSharding(mesh, P())
        plain = load_model({directory!r})
        for source in ({directory!r}, {str(tmp_path / "orbax")!r}):
            if source != {directory!r}:
                save_model(plain, source)
            model = load_model(source, shardings=shardings)
            wq = model.params["layers"]["wq"]
            assert wq.sharding.spec == P(None, "model", None), wq.sharding
            assert {{s.data.shape[1:] for s in wq.addressable_shards}} == {{(16, 64)}}
            assert model.params["embed"].addressable_shards[0].data.shape == (64, 64)
            flat = jax.tree_util.tree_leaves
            assert all(np.array_equal(a, b) for a, b in zip(flat(model.params), flat(plain.params)))
        print("OK")
    """)
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(__file__)),
        timeout=300,
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_loading_holds_about_one_tensor_on_the_host(tmp_path):
    """Eight layers, no tensor over 1/26 of the model. The loader holds one tensor read from the
    file (plus ~100 KB of bookkeeping and the reader's buffers) at a time; a loader that held all
    host copies before placing them, or let asynchronous transfers pile up, would peak at up to
    the model's size."""
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=4,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    load_model(str(tmp_path))  # the first load in a process also imports XLA's compiler modules
    stats = peak_host_bytes_while_loading(str(tmp_path))
    largest = 64 * 1024 * 4
    assert stats["param_bytes"] > 20 * largest
    assert stats["traced_peak"] < 3 * largest, stats


# --- errors name the file and the tensor ---------------------------------------------------------


@pytest.fixture
def broken(checkpoints, tmp_path):
    """A writable copy of the llama checkpoint."""
    directory = tmp_path / "ckpt"
    shutil.copytree(checkpoints["llama"][0], directory)
    return directory


def edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_error_truncated_header(broken):
    file = broken / "model.safetensors"
    file.write_bytes(file.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=rf"{file}: not a readable safetensors file"):
        load_model(str(broken))


def test_error_missing_shard(checkpoints, tmp_path):
    checkpoints["llama"][1].save_pretrained(tmp_path, max_shard_size="60KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = index["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    os.remove(tmp_path / victim)
    with pytest.raises(CheckpointError, match=rf"shard file {victim} is missing"):
        load_model(str(tmp_path))


def test_error_wrong_shape(broken):
    edit_config(broken, intermediate_size=96)
    with pytest.raises(
        CheckpointError,
        match=r"model.safetensors: tensor model.layers.0.mlp.down_proj.weight: shape \[64, 128\], "
        r"but the config needs \[64, 96\]",
    ):
        load_model(str(broken))


def test_error_unknown_architecture(broken):
    edit_config(broken, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(
        CheckpointError, match=r"config.json: unsupported architecture model_type='gpt2'"
    ):
        load_model(str(broken))


def test_error_missing_tensor_and_bad_dtype(broken):
    from safetensors.numpy import load_file, save_file

    file = broken / "model.safetensors"
    tensors = load_file(file)
    up = tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, file)
    with pytest.raises(
        CheckpointError, match=r"tensor model.layers.1.mlp.up_proj.weight is missing"
    ):
        load_model(str(broken))
    tensors["model.layers.1.mlp.up_proj.weight"] = up.astype(np.float64)
    save_file(tensors, file)
    with pytest.raises(
        CheckpointError, match=rf"{file}: tensor model.layers.1.mlp.up_proj.weight has dtype F64"
    ):
        load_model(str(broken))


def test_error_no_checkpoint(tmp_path):
    with pytest.raises(
        CheckpointError, match="no jengine_config.json, config.json or single .gguf"
    ):
        load_model(str(tmp_path))
    with pytest.raises(CheckpointError, match="no such file or directory"):
        load_model(str(tmp_path / "missing.json"))
