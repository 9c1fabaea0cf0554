"""The notebooks run top to bottom and are committed without outputs.

They run through nbclient, the engine nbmake uses (``pytest --nbmake notebooks/`` does the same by
hand), in a kernel that inherits this session's environment: offline, temp caches, and the shared
``TRANSFUSION_MOT_CACHE`` so the debug VAE is trained once for the notebooks and the other tests.
Each notebook asserts its own invariants (tied MoT == dense, cached == uncached sampling, ...), so a
successful run checks behaviour, not just syntax.
"""
from __future__ import annotations

import time
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = REPO / "notebooks"
EXPECTED = ["01_quickstart", "02_mot_anatomy", "03_sampling", "04_evaluate"]
NOTEBOOKS = [NOTEBOOKS_DIR / f"{name}.ipynb" for name in EXPECTED]
CELL_TIMEOUT_S = 300  # per cell; a hung kernel fails the test instead of the whole suite


def _read(path: Path) -> nbformat.NotebookNode:
    if not path.is_file():
        pytest.fail(f"{path} is missing")
    return nbformat.read(path, as_version=4)


def test_the_four_notebooks_exist():
    assert sorted(p.stem for p in NOTEBOOKS_DIR.glob("*.ipynb")) == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    nb = _read(path)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells)
             if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, f"{path.name}: code cells {dirty} keep outputs or execution counts; strip them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, debug_vae, tmp_path, monkeypatch):  # debug_vae (conftest): no notebook pays for it
    from nbclient import NotebookClient

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the kernel's tempfile.mkdtemp (the notebook's runs) lands here
    nb = _read(path)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})  # cwd = notebooks/, as nbmake
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError naming the cell and its traceback
    seconds = time.perf_counter() - start
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{path.name}: {errors[0].ename}: {errors[0].evalue}"
    figures = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert figures >= 1, f"{path.name} ran but drew no figure"
    print(f"{path.name}: {seconds:.1f} s, {figures} figures")
