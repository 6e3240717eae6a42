"""Every bit of a fixed set of rollouts and trainer-side logprobs is unchanged (tests/golden.py).

A change that alters any of the outputs in tests/data/golden.json must say why in its commit and
BUILD.md and re-record them (`python -m tests.golden record`). Runs in a subprocess: the tp / dp
cases need 4 forced CPU devices.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("cases", [
    pytest.param("tp1,rl_token_logprobs", id="rollout_and_trainer"),
    pytest.param(None, id="all", marks=pytest.mark.slow),
])  # fmt: skip
def test_golden_outputs_are_bitwise_unchanged(cases):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.golden", "check"] + ([f"--cases={cases}"] if cases else []),
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200, check=False,
    )
    assert proc.stdout.strip(), proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["cases"] >= (13 if cases is None else len(cases.split(",")))
    assert report["differences"] == {}, report["differences"]
    assert proc.returncode == 0, proc.stderr[-4000:]
