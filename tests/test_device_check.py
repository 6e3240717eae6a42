"""`benchmarks/device_check.py --platform cpu --size tiny` runs here as on a lent GPU: every section
writes its figures and the tests it runs pass (no speed checks)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_device_check_tiny_on_cpu(tmp_path):
    out = tmp_path / "check"
    cmd = [
        sys.executable,
        "benchmarks/device_check.py",
        "--platform",
        "cpu",
        "--size",
        "tiny",
        "--out",
        str(out),
    ]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    result = json.loads((out / "device_check.json").read_text())
    assert result["errors"] == {}
    for group in ("kernels", "invariance"):
        t = result["tests"][group]
        assert t["passed"] > 0 and t["failed"] == 0, t
    rows = result["decode"]["rows"]
    assert {(r["numerics"], r["batch"]) for r in rows} == {
        (n, b) for n in ("invariant", "fast") for b in (1, 4)
    }
    assert all(r["step_ms"] and r["roofline_ms"] > 0 and r["decode_steps_timed"] > 0 for r in rows)
    engines = [r["engine"] for r in result["rollout"]["rows"]]
    assert engines == ["jengine invariant", "jengine fast", "transformers generate"]
    assert result["rollout"]["hf_logprob_max_abs_diff"] < 1e-3  # same weights, fp32
    assert result["compile"] and all(c["compile_s"] >= 0 for c in result["compile"])
    assert "tests invariance: 1 passed, 0 failed" in (out / "summary.txt").read_text()
