"""Shared fixtures: the tiny random model (built in-process, never downloaded)."""

import atexit
import os
import re
import shutil
import tempfile

import numpy as np
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the session and every subprocess it starts: a module
# compiles what an earlier one did again (the fixture below drops the in-memory programs after
# each module) and the subprocesses run the session's steps again. A cached executable is the
# compiled program itself: loading it changes no bit. Removed when the session ends.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jengine-tests-xla-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

from jengine import Model, ModelConfig, init_params  # noqa: E402

# The slow tier. `python -m pytest -q -m "not slow" tests` (README's test command) is the quick
# tier: under 10 minutes on 2 cores, with a test for every guarantee in README's table; `.ci/run`
# also runs `-m slow`. Listed here, in one place, by node-id prefix (a file, a test or one
# parametrization; `*` matches anything), besides the tests marked `@pytest.mark.slow` in their
# files: end-to-end runs (real models, GRPO, notebooks, subprocesses, the mutation check) and the
# larger variants of guarantees that a quick test already holds.
_ATTENTION = "tests/pallas_kernels/test_ragged_paged_attention.py::"
_MOE = "tests/pallas_kernels/test_moe.py::"
SLOW = (
    "tests/pallas_kernels/test_matmul.py::test_every_tile_size_gives_the_row_tile_bits[1536x576",
    "tests/pallas_kernels/test_matmul.py::test_every_tile_size_gives_the_row_tile_bits[896x4864",
    _ATTENTION + "test_a_window_longer_than_the_prompt",
    _ATTENTION + "test_every_query_tile_gives_the_q_tile_bits[2-",
    _ATTENTION + "test_every_query_tile_gives_the_q_tile_bits[4-",
    _ATTENTION + "test_kv_blocks_are_reduced_in_logical_order[*-128]",
    _ATTENTION + "test_matches_reference_on_a_mixed_batch[*tpu_interpret]",
    _ATTENTION + "test_skipping_blocks_outside_the_window*tpu_interpret]",
    _ATTENTION + "test_windowed_token_is_bitwise_invariant[tpu_interpret]",
    _MOE + "test_gradient_matches_torch_autograd[pallas_interpret]",
    _MOE + "test_matches_reference_and_a_dense_numpy_moe[bfloat16-",
    _MOE + "test_matches_reference_and_a_dense_numpy_moe[float32-pallas_interpret]",
    _MOE + "test_matches_reference_and_a_dense_numpy_moe[float32-tpu_interpret]",
    _MOE + "test_routing_matches_hugging_face_routers[qwen3_moe-False-8]",
    _MOE + "test_routing_matches_numpy[False]",
    _MOE + "test_row_is_bitwise_invariant_to_expert_load_and_batch[pallas_interpret]",
    _MOE + "test_row_is_bitwise_invariant_to_expert_load_and_batch[tpu_interpret]",
    _MOE + "test_row_is_its_experts_dense_mlp_combined_by_rank[bfloat16-",
    _MOE + "test_row_is_its_experts_dense_mlp_combined_by_rank[float32-tpu_interpret]",
    _MOE + "test_tpu_kernel_on_two_cores",
    "tests/test_bench.py",
    "tests/test_moe_model.py::test_checkpoint_matches_transformers",
    "tests/test_moe_model.py::test_rollout_is_bitwise",
    "tests/test_moe_model.py::test_a_request_is_bitwise_alone",
    "tests/test_moe_model.py::test_output_independent_of",
    "tests/test_moe_model.py::test_prefix_cache_hits",
    "tests/test_moe_model.py::test_routed_experts",
    "tests/test_moe_model.py::test_shared_expert",
    "tests/test_moe_model.py::test_expert_parallel",
    "tests/test_moe_model.py::test_tied_router_logits",
    "tests/test_moe_model.py::test_score_row_is_bitwise_alone_and_in_a_crowd",
    "tests/test_cli.py::test_demo_tiny",
    "tests/test_cli.py::test_generate_then_score_round_trip",
    "tests/test_cli.py::test_parity_reports_every_metric",
    "tests/test_cli.py::test_trace_holds_one_run",
    "tests/test_device_check.py::test_device_check_on_cpu",
    "tests/test_engine.py::test_compilations_stay_within_bucket_table",
    "tests/test_engine.py::test_each_logprobs_mode_matches_score",
    "tests/test_engine.py::test_lm_head_dtype_matches_score[tiny_model-bfloat16]",
    "tests/test_engine.py::test_lm_head_dtype_matches_score[tiny_model_bf16-model]",
    "tests/test_engine.py::test_output_independent_of_batching[max_num_seqs=16",
    "tests/test_engine.py::test_output_independent_of_batching[min_token_bucket=2]",
    "tests/test_engine.py::test_output_independent_of_batching[page_size=",
    "tests/test_export.py::test_every_bucket_exports[gemma3-270m-cuda]",
    "tests/test_export.py::test_every_bucket_exports[gemma3-270m-tpu]",
    "tests/test_export.py::test_every_bucket_exports[qwen3-0.6b-cuda]",
    "tests/test_export.py::test_every_bucket_exports[qwen3-0.6b-tpu]",
    "tests/test_export.py::test_largest_bucket_exports_at_full_depth",
    "tests/test_export.py::test_moe_step_exports_at_qwen3_30b_a3b_shape",
    "tests/test_gemma.py::test_bf16_rollout_logprobs_are_bitwise_score",
    "tests/test_gemma.py::test_output_independent_of_batching_pages_and_preemption[min_token*",
    "tests/test_gemma.py::test_tensor_parallel_is_bitwise_one_device",
    "tests/test_gguf.py::test_smollm2_",
    "tests/test_grpo.py",
    "tests/test_long_context.py",
    "tests/test_multihost.py",
    "tests/test_mutations.py::test_a_harmless_change",
    "tests/test_notebooks.py",
    "tests/test_parity_guard.py::test_a_fraction_is_a_deterministic_subset",
    "tests/test_parity_guard.py::test_every_finished_request_is_verified_and_exact",
    "tests/test_rl.py::test_example_reward_rises",
    "tests/test_sampling.py::test_a_row_keeps_its_bits_in_every_tile_and_batch",
    "tests/test_tool_use.py",
    "tests/test_tpu_interpret.py::test_outputs_independent_of_batch",
    "tests/test_tunix.py::test_grpo_learner",
    "tests/test_wheel.py",
)
_SLOW = [re.compile(".*".join(map(re.escape, pattern.split("*")))) for pattern in SLOW]


def pytest_collection_modifyitems(config, items):
    """Marks the tests `SLOW` names (node-id prefixes; `*` matches any run of characters)."""
    for item in items:
        if any(p.match(item.nodeid) for p in _SLOW):
            item.add_marker(pytest.mark.slow)


def _memory_maps() -> int:
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux
        return 0


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs(request):
    """Drops every compiled program after each test module. XLA:CPU maps a few memory regions
    per executable and never unmaps them while jax's caches hold it; one process running the whole
    suite would otherwise reach the kernel's per-process limit (vm.max_map_count, 65530 by
    default), where LLVM's next allocation fails and the process dies with SIGSEGV."""
    yield
    log = os.environ.get("JENGINE_TEST_MAPS_LOG")
    before = _memory_maps() if log else 0
    import gc

    import jax

    from jengine.runner import clear_compiled_steps

    jax.clear_caches()
    clear_compiled_steps()
    gc.collect()
    if log:
        with open(log, "a") as f:
            f.write(f"{request.module.__name__} {before} {_memory_maps()}\n")


@pytest.fixture(scope="session")
def tiny_model() -> Model:
    cfg = ModelConfig.named("tiny")
    return Model(cfg, init_params(cfg, seed=0))


@pytest.fixture(scope="session")
def tiny_model_bf16() -> Model:
    cfg = ModelConfig.named("tiny").replace(dtype="bfloat16")
    return Model(cfg, init_params(cfg, seed=0))


def same_bits(a, b) -> bool:
    """Bitwise equality of float32 arrays: -0.0 and +0.0 (and NaN payloads) count as different."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def random_prompts(n: int, vocab: int, lo: int = 3, hi: int = 40, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [list(map(int, rng.integers(2, vocab, rng.integers(lo, hi)))) for _ in range(n)]


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")  # fmt: skip


def text_tokenizer(vocab_size: int = 512):
    """A byte-level BPE `jengine.Tokenizer` with exactly `vocab_size` ids, trained here on a small
    arithmetic corpus (no download): the 128 ASCII bytes (every id decodes to ASCII text), ChatML's
    `<|im_start|>` (id 0) and `<|im_end|>` (id 1, the EOS, as the tiny model's), merges for the
    rest. Decoding then encoding changes ids: two sampled tokens "3", "+" decode to text that
    encodes as one merged token."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from jengine.tokenizer import Tokenizer, _bytes_to_unicode

    rng = np.random.default_rng(0)
    words = ("the a calculator result answer is of and to what <calc> </calc> <result> "
             "</result> plus times minus equals number tool call compute step first then").split()
    corpus = [f"What is {a} + {b}? <calc>{a}+{b}</calc> <result>{a + b}</result> "
              + " ".join(rng.choice(words, 8))
              for a, b in rng.integers(0, 1000, (400, 2))]  # fmt: skip
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    ascii_bytes = [_bytes_to_unicode()[b] for b in range(128)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=ascii_bytes, limit_alphabet=128)  # fmt: skip
    backend.train_from_iterator(corpus, trainer)
    assert backend.get_vocab_size() == vocab_size
    return Tokenizer(backend=backend, chat_template=CHATML, eos_token_ids=(1,))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return text_tokenizer()
