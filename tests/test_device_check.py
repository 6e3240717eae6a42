"""`python benchmarks/device_check.py --platform cpu` (BUILD.md's command, word for word) runs
here as on a lent GPU: every section writes its figures and the tests it runs pass (no speed
checks). And no script directory holds a module that shadows an importable package: a script run
as `python benchmarks/X.py` has benchmarks/ first on sys.path, so a `benchmarks/kernels.py` once
stood in for the `kernels` package that transformers imports, and the rollout section failed."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Directories whose files are run as scripts (`python DIR/NAME.py`: DIR is first on sys.path).
SCRIPT_DIRS = ("benchmarks", "tests", "jengine/examples")
# tests/pallas_kernels (the kernel tests) shares the name of the repo's own pallas_kernels package;
# the one script run from tests/, tests/mutations.py, imports neither (it copies the tree and runs
# pytest there).
ALLOWED = {("tests", "pallas_kernels")}


def test_device_check_on_cpu(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # its default --out: a new temporary directory
    cmd = [sys.executable, "benchmarks/device_check.py", "--platform", "cpu"]
    p = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "(tiny)" in p.stdout.splitlines()[0], p.stdout  # cpu's default size
    wrote = [ln for ln in p.stdout.splitlines() if ln.startswith("wrote ")]
    assert len(wrote) == 1, p.stdout
    out_json = wrote[0].split()[1]
    assert out_json.startswith(str(tmp_path)), out_json
    out = pathlib.Path(out_json).parent
    result = json.loads((out / "device_check.json").read_text())
    assert result["errors"] == {}
    assert result["size"] == "tiny" and result["platform"] == "cpu"
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
    summary = (out / "summary.txt").read_text()
    assert "tests invariance: 1 passed, 0 failed" in summary


def _module_names(directory: str) -> list[str]:
    names = []
    for entry in sorted(os.listdir(os.path.join(ROOT, directory))):
        path = os.path.join(ROOT, directory, entry)
        if entry.endswith(".py"):
            name = entry[:-3]
        elif os.path.isdir(path) and not entry.startswith((".", "__")):
            name = entry  # a package, or a namespace package's portion
        else:
            continue
        if name.isidentifier() and not name.startswith("__"):
            names.append(name)
    return names


def test_no_script_module_shadows_an_importable_package(tmp_path):
    """Each module name in a script directory, looked up from outside the checkout's script
    directories: no importable module or package of that name (site-packages, the repo's own
    packages, the standard library) and no installed distribution's top-level name."""
    names = sorted({n for d in SCRIPT_DIRS for n in _module_names(d)})
    probe = textwrap.dedent(
        """
        import importlib.metadata, importlib.util, json, sys
        tops = importlib.metadata.packages_distributions()
        hits = {}
        for name in json.loads(sys.argv[1]):
            spec = importlib.util.find_spec(name)
            where = spec and (spec.origin or list(spec.submodule_search_locations or []))
            if where or name in tops or name in sys.stdlib_module_names:
                hits[name] = [str(where), tops.get(name)]
        print(json.dumps(hits))
        """
    )
    # cwd outside the checkout, so '' on sys.path is no script directory
    p = subprocess.run(
        [sys.executable, "-c", probe, json.dumps(names)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    hits = json.loads(p.stdout)
    shadowing = {
        f"{d}/{n}": hits[n]
        for d in SCRIPT_DIRS
        for n in _module_names(d)
        if n in hits and (d, n) not in ALLOWED
    }
    assert not shadowing, f"rename these modules (they shadow packages): {shadowing}"
