"""`python -m jengine ...` end to end, in subprocesses, on the built-in tiny model.

The subprocesses inherit the session's persistent XLA compilation cache (conftest sets
$JAX_COMPILATION_CACHE_DIR, --compile_cache's default), and generate/demo use the same engine
shapes, so each bucket is compiled once per session.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# generate runs at the demo's engine shapes so their compilations are shared through the cache.
ENGINE_FLAGS = ["--max_model_len=256", "--max_num_seqs=4", "--max_num_batched_tokens=256"]


def jengine_cli(*args, timeout=400):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "jengine", *args]
    return subprocess.run(
        cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_help_documents_every_flag():
    from jengine import cli

    r = jengine_cli("--help")
    assert r.returncode == 0, r.stderr
    for command in cli.COMMANDS:
        assert command in r.stdout
    for name in cli.FLAGS:
        assert f"--{name}" in r.stdout or f"--[no]{name}" in r.stdout, name
    assert jengine_cli("generate", "--help").returncode == 0


@pytest.mark.parametrize(
    "args, needle",
    [
        (["demo", "--no_such_flag=1"], "no_such_flag"),
        (["demo", "--top_p=1.5"], "--top_p"),
        (["demo", "--temperature=-1"], "--temperature"),
        (["demo", "--logprobs_mode=sideways"], "logprobs_mode"),
        (["frobnicate"], "frobnicate"),
        (["generate", "--model=tiny", "--out=x.jsonl"], "--prompts"),
        (["demo", "--model=/no/such/model.gguf"], "--model"),
        (["demo", "--model=tiny", "--page_size=3"], "--page_size"),
        (["demo", "--model=tiny", "--max_model_len=4096"], "--max_model_len"),
        (["score", "--model=tiny", "--input=x.jsonl", "--out=y.jsonl", "--trace=t.jsonl"], "--trace"),
        (["generate", "--model=tiny", "--prompts=x.jsonl", "--out=y.jsonl", "--report_json=r.json"],
         "--report_json"),
        (["score", "--model=tiny", "--input=x.jsonl", "--out=y.jsonl", "--page_size=8"],
         "--page_size"),
        (["serve", "--model=tiny", "--seed=3"], "--seed"),  # a request brings its own
        (["serve", "--model=tiny", "--weights_dir=/no/such/dir"], "--weights_dir"),
    ],
)
def test_bad_command_lines_name_the_flag(args, needle):
    r = jengine_cli(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert needle in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_flags_come_from_the_config_fields():
    """Every SamplingParams / EngineConfig field has a flag whose help is the field's own."""
    import dataclasses

    from jengine import EngineConfig, SamplingParams, cli
    from jengine.server import ServerConfig

    for cls, names in ((SamplingParams, cli.SAMPLING_FLAGS), (EngineConfig, cli.ENGINE_FLAGS),
                       (ServerConfig, cli.SERVER_FLAGS)):  # fmt: skip
        fields = {f.name: f for f in dataclasses.fields(cls)}
        assert sorted(names.values()) == sorted(fields)
        for flag, field in names.items():
            assert fields[field].metadata["help"] in cli.FLAGS[flag].help
            choices = fields[field].metadata.get("choices")
            if choices:
                assert cli.FLAGS[flag].parser.enum_values == list(choices)


def test_trace_holds_one_run(tmp_path):
    prompts = tmp_path / "p.jsonl"
    _write_jsonl(prompts, [{"prompt_token_ids": [3, 4, 5]}])
    trace = tmp_path / "trace.jsonl"
    for _ in range(2):
        r = jengine_cli("generate", "--model=tiny", f"--prompts={prompts}", f"--out={tmp_path / 'o.jsonl'}",
                        f"--trace={trace}", "--max_tokens=3", *ENGINE_FLAGS)  # fmt: skip
        assert r.returncode == 0, r.stderr
    steps = [json.loads(line)["step"] for line in trace.read_text().splitlines()]
    assert steps == list(range(len(steps))) and len(steps) == 3  # one prefill step, two decodes


def test_demo_tiny(tmp_path):
    report = tmp_path / "demo.json"
    r = jengine_cli("demo", "--model=tiny", f"--report_json={report}")
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("req-")]
    assert len(rows) == 4
    m = re.search(r"parity .*: (\d+)/(\d+) logprobs bitwise equal", r.stdout)
    assert m and m.group(1) == m.group(2) and int(m.group(2)) > 0, r.stdout
    assert "tok/s" in r.stdout
    data = json.loads(report.read_text())
    assert data["parity"]["max_abs_diff"] == 0.0
    assert data["trace"]["compiled_steps"] >= 1


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_generate_then_score_round_trip(tmp_path):
    import jengine
    from jengine import SamplingParams
    from jengine.models.loading import load_model

    rng = np.random.default_rng(1)
    prompts = [list(map(int, rng.integers(2, 512, n))) for n in (5, 17, 9)]
    rows = [{"prompt_token_ids": p, "request_id": f"p{i}"} for i, p in enumerate(prompts)]
    rows[2]["sampling_params"] = {"temperature": 0.0}  # a per-line override: greedy
    _write_jsonl(tmp_path / "prompts.jsonl", rows)
    sampling = ["--temperature=0.8", "--top_k=40", "--top_p=0.95", "--max_tokens=8"]
    r = jengine_cli("generate", "--model=tiny", f"--prompts={tmp_path / 'prompts.jsonl'}",
                    f"--out={tmp_path / 'out.jsonl'}", "--seed=3", *sampling, *ENGINE_FLAGS)  # fmt: skip
    assert r.returncode == 0, r.stderr
    outs = _read_jsonl(tmp_path / "out.jsonl")
    assert [o["request_id"] for o in outs] == ["p0", "p1", "p2"]
    for o, p in zip(outs, prompts):
        assert o["prompt_token_ids"] == p
        assert len(o["token_ids"]) == len(o["logprobs"]) == len(o["policy_versions"]) > 0
        assert o["finish_reason"] in ("stop", "length")
        assert set(o["policy_versions"]) == {0}

    # the trainer side, in process: bitwise equal to what generate wrote
    model = load_model("tiny")
    params = [SamplingParams(temperature=0.8, top_k=40, top_p=0.95)] * 2 + [
        SamplingParams(temperature=0.0, top_k=40, top_p=0.95)
    ]
    scored = jengine.score(model, prompts, [o["token_ids"] for o in outs], params)
    for s, o in zip(scored, outs):
        np.testing.assert_array_equal(
            s.view(np.uint32), np.asarray(o["logprobs"], np.float32).view(np.uint32)
        )

    # and through the `score` command, with generate's output as its input
    r = jengine_cli("score", "--model=tiny", f"--input={tmp_path / 'out.jsonl'}",
                    f"--out={tmp_path / 'scores.jsonl'}", *sampling)  # fmt: skip
    assert r.returncode == 0, r.stderr
    scores = _read_jsonl(tmp_path / "scores.jsonl")
    assert [s["request_id"] for s in scores] == ["p0", "p1", "p2"]
    for s, o in zip(scores, outs):
        a = np.asarray(s["logprobs"], np.float32).view(np.uint32)
        np.testing.assert_array_equal(a, np.asarray(o["logprobs"], np.float32).view(np.uint32))


def test_generate_rejects_bad_prompt_lines(tmp_path):
    _write_jsonl(tmp_path / "p.jsonl", [{"prompt_token_ids": [1, 2]}, {"prompt": "text"}])
    r = jengine_cli("generate", "--model=tiny", f"--prompts={tmp_path / 'p.jsonl'}",
                    f"--out={tmp_path / 'o.jsonl'}")  # fmt: skip
    assert r.returncode == 2
    assert "p.jsonl:2" in r.stderr and "tokenizer" in r.stderr


def test_parity_reports_every_metric(tmp_path):
    report = tmp_path / "parity.json"
    r = jengine_cli("parity", "--model=tiny", "--num_prompts=3", "--max_tokens=6", "--max_num_batched_tokens=16",
                    f"--report_json={report}")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    for metric in (
        "bitwise_equal",
        "max_abs_diff",
        "ratio_mean",
        "k3",
        "k1",
        "clip_frac",
        "ess_frac",
    ):
        assert metric in r.stdout
    assert "OK:" in r.stdout
    data = json.loads(report.read_text())
    main = data["engine settings"]
    assert main["bitwise_equal"] == main["num_tokens"] == 18
    assert main["max_abs_diff"] == 0.0 and main["ratio_mean"] == 1.0 and main["k3"] == 0.0
    bf16 = data["trainer lm_head_dtype=bfloat16"]
    assert bf16["max_abs_diff"] > 0.0  # a bf16 head on the trainer side alone breaks parity


def test_unknown_model_lists_every_name_it_could_be():
    """--model=smollm3 (a typo) lists the checkpoint names the help uses, not only the shipped
    configs, and loads nothing."""
    from jengine.models.loading import CHECKPOINT_NAMES

    r = jengine_cli("demo", "--model=smollm3")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    words = set(re.findall(r"[\w.-]+", r.stderr))
    for name in ["auto", *CHECKPOINT_NAMES, "tiny", "qwen3-0.6b"]:
        assert name in words, (name, r.stderr)
    assert "did you mean smollm2" in r.stderr


@pytest.mark.parametrize("command", ["score", "generate"])
def test_input_lines_are_checked_before_the_model_loads(tmp_path, command):
    """A bad input line is reported before the model is loaded: with a model that cannot load,
    the error is still the line's."""
    good = {"prompt_token_ids": [1, 2], "token_ids": [3]}
    bad = {**good, "sampling_params": {"top_p": 7.0}}
    _write_jsonl(tmp_path / "in.jsonl", [good, bad])
    io = "--input" if command == "score" else "--prompts"
    r = jengine_cli(command, f"--model={tmp_path / 'missing.gguf'}", f"{io}={tmp_path / 'in.jsonl'}",
                    f"--out={tmp_path / 'out.jsonl'}")  # fmt: skip
    assert r.returncode == 2, r.stdout + r.stderr
    assert "in.jsonl:2" in r.stderr and "--top_p" in r.stderr, r.stderr
    assert "GGUF" not in r.stderr, r.stderr


@pytest.mark.parametrize(
    "line, where",
    [
        ('{"prompt_token_ids": [1, 2], "token_ids":', "at the end of the line (column 42)"),
        ('{"prompt_token_ids": [1, 2,, 3], "token_ids": [3]}', "at column 28"),
    ],
)
def test_json_errors_name_the_line_and_column_of_the_file(tmp_path, line, where):
    """The file's line number and the column within that line, not the decoder's own count of
    lines ("line 2 column 1" for a line that ends too early)."""
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"prompt_token_ids": [1], "token_ids": [2]}) + "\n" + line + "\n")
    r = jengine_cli("score", "--model=tiny", f"--input={path}", f"--out={tmp_path / 'o.jsonl'}")
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"in.jsonl:2: not JSON: Expecting value {where}" in r.stderr, r.stderr
    assert not re.search(r"line \d+ column", r.stderr), r.stderr
