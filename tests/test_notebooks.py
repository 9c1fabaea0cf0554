"""The notebooks run top to bottom and are committed with their outputs, so a reader on the web sees the
pictures (``jupyter nbconvert --to notebook --execute --inplace notebooks/*.ipynb`` writes them).

They run through nbclient, the engine nbmake uses (``pytest --nbmake notebooks/`` does the same by
hand), in a kernel that inherits this session's environment: offline, temp caches, and the shared
``TRANSFUSION_MOT_CACHE`` so the debug VAE is trained once for the notebooks and the other tests.
Each notebook asserts its own invariants (tied MoT == dense, cached == uncached sampling, ...), so a
successful run checks behaviour, not just syntax. ``TFM_RUN`` names the trained run a notebook loads:
01 runs the fallback (no run there: it trains a quick debug run), 03 and 04 load the session's debug run.
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


MAX_NOTEBOOK_BYTES = 1_500_000  # outputs are a few small figures, not a data dump


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_with_outputs_and_pictures(path):
    nb = _read(path)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    unrun = [i for i, c in enumerate(code) if c.execution_count is None]
    assert not unrun, f"{path.name}: code cells {unrun} were not executed; run nbconvert --execute --inplace"
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), f"{path.name}: run top to bottom once"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{path.name}: committed with an error output: {errors[0].ename}"
    assert sum("image/png" in o.get("data", {}) for c in code for o in c.outputs) >= 1, f"{path.name}: no picture"
    assert path.stat().st_size < MAX_NOTEBOOK_BYTES, f"{path.name}: {path.stat().st_size} bytes"
    text = path.read_text()
    assert str(REPO) not in text or str(REPO) == "/", f"{path.name}: outputs name this machine's checkout {REPO}"


def test_a_trained_run_is_loaded_where_one_exists_and_the_fallback_is_said():
    for path in NOTEBOOKS:
        nb = _read(path)
        if path.stem == "02_mot_anatomy":  # no trained model needed: masks, routing, parameter counts
            continue
        assert "TFM_RUN" in nb.cells[1].source and "RUN = " in nb.cells[1].source, path.name
        assert "the outputs committed with this notebook come from that fallback" in nb.cells[0].source, path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, debug_vae, debug_run, tmp_path, monkeypatch):  # debug_vae: no notebook pays for it
    from nbclient import NotebookClient

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the kernel's tempfile.mkdtemp (the notebook's runs) lands here
    monkeypatch.setenv("TFM_RUN", str(tmp_path / "no_run" if path.stem == "01_quickstart" else debug_run))
    nb = _read(path)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})  # cwd = notebooks/, as nbmake
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError naming the cell and its traceback
    said = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    if path.stem != "02_mot_anatomy":  # which run it showed: the fallback for 01, the trained run for 03 and 04
        assert ("training the debug config" in said) == (path.stem == "01_quickstart"), said[-2000:]
    seconds = time.perf_counter() - start
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{path.name}: {errors[0].ename}: {errors[0].evalue}"
    figures = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert figures >= 1, f"{path.name} ran but drew no figure"
    print(f"{path.name}: {seconds:.1f} s, {figures} figures")
