"""An installed wheel (not the checkout) works: the shipped configs are package data, and a tiny
`generate` runs from a directory outside the checkout."""

from __future__ import annotations

import glob
import os
import site
import subprocess
import sys
import venv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMOKE = """
import os, sys
import jengine
from jengine import Engine, EngineConfig, Model, ModelConfig, SamplingParams, init_params
here = os.path.dirname(jengine.__file__)
assert here.startswith(sys.prefix), (here, sys.prefix)  # the installed copy, not the checkout
cfg = ModelConfig.named("tiny")
engine = Engine(Model(cfg, init_params(cfg)), EngineConfig(max_model_len=32, max_num_seqs=2,
                                                           max_num_batched_tokens=16))
out = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=3, seed=0))[0]
assert len(out.token_ids) == 3
print("OK", here, sorted(os.listdir(os.path.join(here, "configs")))[:3])
"""


def outer_site_dirs() -> list[str]:
    """The site-packages directories this interpreter imports from: a virtual environment's own
    (and the base's when it was made with --system-site-packages), else the interpreter's; and
    the user's when enabled."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def test_installed_wheel_ships_configs_and_generates(tmp_path):
    wheels = tmp_path / "wheels"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", ROOT, "-w", str(wheels)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = glob.glob(str(wheels / "jengine-*.whl"))
    env_dir = tmp_path / "env"
    # The dependencies (jax, ...) come from the running interpreter's site-packages; jengine itself
    # only from the wheel (the assertion in SMOKE checks which copy was imported).
    # `system_site_packages=True` would not do: it inherits the *base* interpreter's
    # site-packages, which has no jax when the suite runs inside a virtual environment.
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    r = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", wheel],
                       capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    # Then the outer site-packages, through a .pth file in the environment's own: added once the
    # wheel is in (so pip sees no other jengine), searched after the environment's own (so the
    # wheel's jengine wins over an editable install out there), each with its .pth files (editable
    # finders, namespace packages), as with system_site_packages.
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    inner = subprocess.run([python, "-c", purelib], capture_output=True, text=True, timeout=60,
                           check=True).stdout.strip()  # fmt: skip
    with open(os.path.join(inner, "zz_outer_site_packages.pth"), "w") as f:
        f.writelines(f"import site; site.addsitedir({d!r})\n" for d in outer_site_dirs())
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([python, "-c", SMOKE], cwd=outside, capture_output=True, text=True,
                       timeout=600, check=False, env={**env, "JAX_PLATFORMS": "cpu"})  # fmt: skip
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr[-3000:]
