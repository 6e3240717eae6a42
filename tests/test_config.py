import dataclasses

import pytest

from jengine import EngineConfig, ModelConfig, SamplingParams


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(min_p=2.0), "min_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(seed=-3), "seed"),
        (dict(stop_token_ids=[1]), "stop_token_ids"),
        (dict(logprobs=21), "logprobs"),
        (dict(top_k=1.5), "top_k"),
    ],
)
def test_sampling_params_errors_name_the_field(kwargs, field):
    with pytest.raises((ValueError, TypeError), match=field):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(page_size=12), "page_size"),
        (dict(page_size=0), "page_size"),
        (dict(min_token_bucket=12), "min_token_bucket=12"),
        (dict(min_token_bucket=0), "min_token_bucket"),
        (dict(max_num_seqs=0), "max_num_seqs"),
        (dict(max_num_seqs=64, max_num_batched_tokens=32), "max_num_batched_tokens"),
        (dict(logprobs_mode="logprobs"), "logprobs_mode"),
        (dict(numerics="exact"), "numerics"),
        (dict(lm_head_dtype="float16"), "lm_head_dtype"),
        (dict(tensor_parallel_size=0), "tensor_parallel_size"),
    ],
)
def test_engine_config_errors_name_the_field(kwargs, field):
    with pytest.raises((ValueError, TypeError), match=field):
        EngineConfig(**kwargs)


def test_configs_are_frozen_and_hashable():
    cfg = ModelConfig.named("tiny")
    hash(cfg), hash(EngineConfig()), hash(SamplingParams())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 3


@pytest.mark.parametrize("name", ["tiny", "qwen2.5-0.5b", "qwen3-0.6b", "llama-3.2-1b", "llama-3.1-8b", "smollm2-135m"])
def test_shipped_configs_load(name):
    cfg = ModelConfig.named(name)
    assert cfg.num_heads % cfg.num_kv_heads == 0


def test_unknown_config_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="tiny"):
        ModelConfig.named("gpt-5")


def test_hf_config_unknown_architecture():
    with pytest.raises(ValueError, match="unsupported architecture"):
        ModelConfig.from_dict(
            {"model_type": "mamba", "architectures": ["MambaForCausalLM"], "hidden_size": 8,
             "num_attention_heads": 2}
        )


def test_model_config_checks_heads():
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig.named("tiny").replace(num_kv_heads=3)
