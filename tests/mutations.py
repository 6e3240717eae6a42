"""Mutation check: named bugs that the test suite must catch.

Each mutation is one exact text replacement in one file of the library (the old text must occur
exactly once, so a mutation whose code has moved fails loudly instead of silently testing
nothing). It is applied to a fresh temporary copy of the repository, and a small named subset of
the suite runs there (`python -m pytest -q -x <files> -k <expr>`, the copy as cwd and first on
PYTHONPATH). The mutation is caught when that run fails in one of the tests named for it; it
survives when the run passes, and the check reports an error when the run fails some other way
(collection errors, no test selected, an unexpected test failing).

    python tests/mutations.py            # all, one after another; exit 1 unless all caught
    python tests/mutations.py NAME ...   # only these
    python tests/mutations.py --list

tests/test_mutations.py runs the same check in the suite.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPIED = ("jengine", "pallas_kernels", "tests", "configs", "benchmarks", "pyproject.toml")
IGNORED = shutil.ignore_patterns("__pycache__", ".hypothesis", ".pytest_cache", "*.pyc")
TIMEOUT_S = 600  # per mutation


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    what: str  # the bug, in words
    path: str  # file to change, relative to the repository root
    old: str  # exact text, must occur exactly once
    new: str
    files: tuple[str, ...]  # the test files to run
    k: str  # pytest -k expression selecting the subset
    expect: tuple[str, ...]  # test function names; one of them must be the failure


MUTATIONS = [
    Mutation(
        "scheduler_version_guard",
        "pages filled under an older policy version are registered under the new version's keys",
        "jengine/scheduler.py",
        "        if after <= before or seq.kv_version != self.version:\n",
        "        if after <= before:\n",
        ("tests/test_scheduler.py",),
        "old_version",
        ("test_pages_filled_under_an_old_version_are_never_served_under_the_new_key",),
    ),
    Mutation(
        "kv_blocks_reversed_cpu",
        "the CPU attention lowering visits KV blocks last to first",
        "pallas_kernels/ragged_paged_attention.py",
        "        key_pos = b * KV_BLOCK + offsets  # [B]\n"
        "        logical = b * units_per_block + jnp.arange(units_per_block)",
        "        rb = num_blocks - 1 - (b - first)\n"
        "        key_pos = rb * KV_BLOCK + offsets  # [B]\n"
        "        logical = rb * units_per_block + jnp.arange(units_per_block)",
        ("tests/pallas_kernels/test_ragged_paged_attention.py",),
        "logical_order and cpu",
        ("test_kv_blocks_are_reduced_in_logical_order",),
    ),
    Mutation(
        "kv_blocks_reversed_pallas",
        "the generic Pallas attention kernel's fori_loop visits KV blocks last to first",
        "pallas_kernels/pallas_ragged_paged_attention.py",
        "    state = jax.lax.fori_loop(first, end, step, init_state(*q.shape))",
        "    state = jax.lax.fori_loop(\n"
        "        first, end, lambda i, s: step(end - 1 - (i - first), s), init_state(*q.shape)\n"
        "    )",
        ("tests/pallas_kernels/test_ragged_paged_attention.py",),
        "logical_order and pallas_interpret",
        ("test_kv_blocks_are_reduced_in_logical_order",),
    ),
    Mutation(
        "top_p_before_top_k",
        "processed_logits computes the top-p threshold before top-k drops tokens (vLLM V1 applies "
        "top-k first and top-p to the survivors)",
        "jengine/sampling.py",
        "        z, cand = jnp.where(z < kth, -jnp.inf, z), jnp.where(cand < kth, -jnp.inf, cand)\n",
        "",
        ("tests/test_semantics.py",),
        "processed_distribution",
        ("test_rollout_and_score_follow_the_processed_distribution",),
    ),
    Mutation(
        "lookup_skips_refcount",
        "a prefix-cache lookup of a page another sequence holds takes no reference",
        "jengine/allocator.py",
        "            else:\n                self.refcount[page] += 1\n",
        "            else:\n                pass\n",
        ("tests/test_allocator_properties.py",),
        "shared_by_reference or TestAllocator",
        ("test_a_cached_page_in_use_is_shared_by_reference", "runTest"),
    ),
    Mutation(
        "trajectory_mask_off_by_one",
        "rl.pack of trajectories aligns the loss mask, logprobs and versions with the token "
        "instead of the column that scores it (one to the left)",
        "jengine/rl/trajectory.py",
        "            out[key][i, : len(row) - 1] = values[1:]\n",
        "            out[key][i, : len(row) - 1] = values[:-1]\n",
        ("tests/test_multi_turn.py",),
        "pack",
        ("test_pack_lays_out_trajectories_for_the_trainer",),
    ),
    Mutation(
        "stop_string_searched_in_the_prompt",
        "a stop string is looked for in the prompt's text and the generated text together",
        "jengine/tokenizer.py",
        "        self.text = \"\"\n",
        "        self.text = tokenizer.decode(list(prompt_ids))\n",
        ("tests/test_stop.py",),
        "prompt",
        ("test_a_stop_string_in_the_prompt_stops_nothing",),
    ),
    Mutation(
        "sampling_key_ignores_position",
        "the sampling noise key is key(seed) alone, not fold_in(key(seed), position)",
        "jengine/sampling.py",
        '        key = jax.random.fold_in(jax.random.key(s, impl="threefry2x32"), p)\n',
        '        key = jax.random.key(s, impl="threefry2x32")\n',
        ("tests/test_sampling.py",),
        "seed_and_position",
        ("test_draws_depend_on_seed_and_position_only",),
    ),
    Mutation(
        "sampling_key_first_row_seed",
        "every row of a batch draws with the first row's seed",
        "jengine/sampling.py",
        "    return jax.vmap(one)(seed, position)\n",
        "    return jax.vmap(one)(jnp.broadcast_to(seed[0], seed.shape), position)\n",
        ("tests/test_sampling.py",),
        "seed_and_position",
        ("test_draws_depend_on_seed_and_position_only",),
    ),
    Mutation(
        "gguf_qk_not_unpermuted",
        "GGUF q/k rows are left in llama.cpp's interleaved order",
        "jengine/models/loading.py",
        "    return w.reshape(heads, d_half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)\n",
        "    return w\n",
        ("tests/test_gguf.py",),
        "unpermute_inverts or (matches_transformers and llama and None)",
        ("test_unpermute_inverts_llama_cpp_permute", "test_gguf_matches_transformers"),
    ),
    Mutation(
        "gguf_qk_permuted_again",
        "GGUF q/k rows are permuted with llama.cpp's permute instead of its inverse",
        "jengine/models/loading.py",
        "    return w.reshape(heads, d_half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)\n",
        "    return w.reshape(heads, 2, d_half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)\n",
        ("tests/test_gguf.py",),
        "matches_transformers and llama and None",
        ("test_gguf_matches_transformers",),
    ),
    Mutation(
        "custom_vjp_scaled_gradient",
        "the invariant ops' custom_vjp returns the reference gradient scaled by 1.001",
        "pallas_kernels/ops.py",
        "        _, vjp = jax.vjp(reference, *args)\n        return vjp(g)\n",
        "        _, vjp = jax.vjp(reference, *args)\n"
        "        return tuple(1.001 * d for d in vjp(g))\n",
        ("tests/pallas_kernels/test_matmul.py", "tests/pallas_kernels/test_rms_norm.py"),
        "gradient and cpu",
        ("test_gradient_matches_the_analytic_gradient", "test_gradient_matches_torch_autograd"),
    ),
    Mutation(
        "attention_reads_four_blocks_at_most",
        "the CPU attention lowering stops after 4 KV blocks (256 keys): invisible to every "
        "bitwise invariance test, since all paths share it",
        "pallas_kernels/ragged_paged_attention.py",
        "    num_blocks = jnp.where(last >= 0, last // KV_BLOCK + 1, 0)\n",
        "    num_blocks = jnp.minimum(jnp.where(last >= 0, last // KV_BLOCK + 1, 0), 4)\n",
        ("tests/test_long_context.py",),
        "transformers",
        ("test_long_sequences_match_transformers",),
    ),
    Mutation(
        "sampler_sums_by_xla_reduce",
        "the sampler's block sums and normaliser go back to XLA's reduce, whose order XLA picks per "
        "program: scoring (no token drawn) merged the two sums into one reduce of another order",
        "jengine/sampling.py",
        "    return m, zb, tree_sum(jnp.exp(zb - m[:, :, None]))\n\n\n"
        "def _log_normalizer(m: jax.Array, block_mass: jax.Array) -> jax.Array:\n"
        "    \"\"\"f32[M, 1]: log(sum(exp(z))) from `_blocks`: the block sums summed, then the max "
        "added.\"\"\"\n"
        "    return jnp.log(tree_sum(block_mass))[:, None] + m\n",
        "    return m, zb, jnp.sum(jnp.exp(zb - m[:, :, None]), axis=-1)\n\n\n"
        "def _log_normalizer(m: jax.Array, block_mass: jax.Array) -> jax.Array:\n"
        "    return jnp.log(jnp.sum(block_mass, axis=-1, keepdims=True)) + m\n",
        ("tests/test_exactness.py",),
        "turnover_widths",
        ("test_trainer_side_matches_the_rollout_at_turnover_widths",),
    ),
    Mutation(
        "prefix_cache_covers_last_token",
        "the prefix cache may cover a whole prompt: a fully cached prompt of k * page_size tokens "
        "computes nothing and its first token is read from another row's logits",
        "jengine/scheduler.py",
        "        return keys[: (len(seq.tokens) - 1) // self.page_size]\n",
        "        return keys[: len(seq.tokens) // self.page_size]\n",
        ("tests/test_prefix_cache_page_multiples.py",),
        "fully_cached",
        ("test_fully_cached_page_multiple_prompts_are_exact",),
    ),
    Mutation(
        "top_logprobs_from_processed_logits",
        "top_logprobs are taken from the processed logits whatever the logprobs_mode (raw modes "
        "list processed values)",
        "jengine/sampling.py",
        "        top_values, top_ids = jax.lax.top_k(source if lse is None else source - lse, "
        "top_n)\n",
        "        processed = z if lse is None else z - _log_normalizer(m, block_mass)\n"
        "        top_values, top_ids = jax.lax.top_k(processed, top_n)\n",
        ("tests/test_top_logprobs_modes.py",),
        "modes_own_top_n and raw",
        ("test_top_logprobs_are_the_modes_own_top_n",),
    ),
    Mutation(
        "rollout_queue_bound_off_by_one",
        "rl.RolloutActor admits a group while queue_size groups are already outstanding (one more "
        "than its documented bound)",
        "jengine/rl/pipeline.py",
        "        return len(building) + len(ready) + self._queue.qsize() < self._queue.maxsize\n",
        "        return len(building) + len(ready) + self._queue.qsize() <= self._queue.maxsize\n",
        ("tests/test_rl_queue_bound.py",),
        "outstanding_never_exceed",
        ("test_groups_outstanding_never_exceed_queue_size",),
    ),
    Mutation(
        "moe_combine_by_arrival",
        "a token's k weighted expert outputs are summed in the order they sit in the grouped "
        "buffer (by expert id, as they arrive there), not by rank",
        "pallas_kernels/moe.py",
        "    return sum_by_rank(products[dest], dtype)\n",
        "    return sum_by_rank(products[jnp.sort(dest, axis=1)], dtype)\n",
        ("tests/pallas_kernels/test_moe.py",),
        "combined_by_rank and cpu",
        ("test_row_is_its_experts_dense_mlp_combined_by_rank",),
    ),
    Mutation(
        "moe_ties_to_the_higher_index",
        "routing's top-k gives a tie among equal probabilities to the higher expert index",
        "pallas_kernels/moe.py",
        "        best = jnp.argmax(remaining, axis=-1).astype(jnp.int32)\n",
        "        flipped = jnp.argmax(remaining[..., ::-1], axis=-1)\n"
        "        best = (remaining.shape[-1] - 1 - flipped).astype(jnp.int32)\n",
        ("tests/pallas_kernels/test_moe.py",),
        "tied_router_logits",
        ("test_tied_router_logits_go_to_the_lower_index",),
    ),
    Mutation(
        "scan_views_every_stack",
        "every stacked layer weight enters the layer scan as a [periods, n, ...] view, n = 1 too "
        "(XLA then copies each such stack on every step)",
        "jengine/models/transformer.py",
        "        if n == 1 and len(w) == periods:  # the stack itself: XLA copies a [periods, 1, ...] view\n",
        "        if False:\n",
        ("tests/test_layer_scan.py",),
        "copies_no_stacked_weight",
        ("test_the_step_copies_no_stacked_weight",),
    ),
]


class MutationError(RuntimeError):
    """A mutation could not be applied (its old text does not occur exactly once)."""


@dataclasses.dataclass
class Result:
    mutation: Mutation
    status: str  # "caught", "survived" or "error"
    seconds: float
    failed: list[str]  # failing test ids
    detail: str  # the tail of pytest's output


def by_name(names) -> list[Mutation]:
    known = {m.name: m for m in MUTATIONS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise KeyError(f"unknown mutations {unknown}; known: {sorted(known)}")
    return [known[n] for n in names]


def check_applies(mutation: Mutation, root: str = ROOT) -> str:
    """The mutated text of `mutation.path` under `root`; raises MutationError unless the old text
    occurs exactly once."""
    with open(os.path.join(root, mutation.path), encoding="utf-8") as f:
        text = f.read()
    count = text.count(mutation.old)
    if count != 1:
        raise MutationError(
            f"{mutation.name}: the text to replace occurs {count} times in {mutation.path} "
            "(expected exactly once: update the mutation to the code as it is now)"
        )
    return text.replace(mutation.old, mutation.new)


def copy_repository(dst: str, root: str = ROOT) -> None:
    """Copies what the tests need; symlinks (jengine/configs -> ../configs) stay relative links."""
    for name in COPIED:
        src = os.path.join(root, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dst, name), symlinks=True, ignore=IGNORED)
        else:
            shutil.copy2(src, os.path.join(dst, name))
    link = os.path.join(dst, "jengine", "configs")
    if not (os.path.islink(link) and not os.path.isabs(os.readlink(link))):
        raise MutationError("jengine/configs must be copied as a relative symlink")


_FAILED = re.compile(r"^FAILED (\S+)", re.MULTILINE)  # failed tests, not setup errors


def run(mutation: Mutation, root: str = ROOT) -> Result:
    """Applies `mutation` to a fresh copy of the repository and runs its subset there."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"mutation-{mutation.name}-") as copy:
        copy_repository(copy, root)
        mutated = check_applies(mutation, copy)
        with open(os.path.join(copy, mutation.path), "w", encoding="utf-8") as f:
            f.write(mutated)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([copy] + [p for p in [env.get("PYTHONPATH")] if p])
        env.setdefault("JAX_PLATFORMS", "cpu")
        # the copy, not an installed jengine, must be what the tests import
        probe = "import jengine, pallas_kernels; print(jengine.__file__, pallas_kernels.__file__)"
        where = subprocess.run(
            [sys.executable, "-c", probe], cwd=copy, env=env, capture_output=True, text=True,
            timeout=120, check=False,
        )  # fmt: skip
        paths = where.stdout.split()
        if where.returncode or len(paths) != 2 or not all(p.startswith(copy) for p in paths):
            why = f"the copy's packages are not the ones imported: {where.stdout}{where.stderr}"
            return Result(mutation, "error", time.monotonic() - start, [], why)
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
               *mutation.files, "-k", mutation.k]  # fmt: skip
        try:
            proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True,
                                  timeout=TIMEOUT_S, check=False)  # fmt: skip
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            why = f"timed out\n{out[-3000:]}"
            return Result(mutation, "error", time.monotonic() - start, [], why)
    out = proc.stdout + proc.stderr
    failed = _FAILED.findall(out)
    seconds = time.monotonic() - start
    if proc.returncode == 0:
        return Result(mutation, "survived", seconds, failed, out[-3000:])
    expected = [f for f in failed if f.split("::")[-1].split("[")[0] in mutation.expect]
    if proc.returncode == 1 and expected:
        return Result(mutation, "caught", seconds, expected, out[-3000:])
    return Result(mutation, "error", seconds, failed,
                  f"pytest exit status {proc.returncode}, failing {failed or 'nothing'} "
                  f"(expected one of {list(mutation.expect)})\n{out[-3000:]}")  # fmt: skip


def run_all(mutations=None, echo=None) -> list[Result]:
    """Runs the mutations one after another (never in parallel)."""
    results = []
    for m in MUTATIONS if mutations is None else mutations:
        result = run(m)
        results.append(result)
        if echo:
            echo(format_result(result))
    return results


def format_result(r: Result) -> str:
    line = f"{r.status:8s} {r.mutation.name:36s} {r.seconds:6.1f}s"
    if r.status == "caught":
        why = next((s.strip() for s in r.detail.splitlines() if s.startswith("E ")), "")
        return f"{line}  by {r.failed[0]}\n{'':46s}{why[:160]}"
    return f"{line}  ({r.mutation.what})\n{r.detail}"


def main(argv: list[str]) -> int:
    if "--list" in argv:
        for m in MUTATIONS:
            print(f"{m.name:36s} {m.path}: {m.what}")
        return 0
    mutations = by_name(argv) if argv else MUTATIONS
    for m in mutations:
        check_applies(m)  # fail fast, before any copy runs, if the code has moved
    start = time.monotonic()
    results = run_all(mutations, echo=lambda s: print(s, flush=True))
    bad = [r for r in results if r.status != "caught"]
    print(f"{len(results) - len(bad)} of {len(results)} mutations caught "
          f"in {time.monotonic() - start:.0f}s")  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
