"""``eval/benchmarks/gpu_check.sh``: its dry run on CPU exercises every step but CUDA's (the GPU tests collected, every
benchmark job at tiny sizes, the merged report), and it refuses to install torch or to run without a GPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

SCRIPT = str(REPO / "eval" / "benchmarks" / "gpu_check.sh")


def _check(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", SCRIPT, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, timeout=timeout)


@pytest.mark.slow  # the whole GPU check at tiny sizes, ~40 s: slow (.ci/run runs it)
def test_gpu_check_dry_run_on_cpu(tmp_path):
    res = _check("--dry-run", "--out", tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    payload = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert payload["dry_run"] and payload["machine"]["device"] == "CPU" and not payload["skipped"]
    jobs = {(r["arch"], r["compiled"], r["attention"]) for r in payload["training"]}
    assert jobs == {("mot", True, "flex"), ("dense", True, "flex"), ("mot", False, "flex"), ("dense", False, "flex"),
                    ("mot", True, "sdpa")}
    assert all(r["step_ms"] > 0 and r["tokens_per_s"] > 0 for r in payload["training"])
    assert payload["attention"]["flex_ms"] > 0 and payload["attention"]["backward"] is False  # no flex backward on CPU
    assert payload["sampling"][0]["s_per_image"] > 0
    assert {"mot_over_dense_debug", "flex_speedup"} <= set(payload["goals"])
    tests = payload["tests"]
    assert tests["returncode"] == 0 and "collected" in tests["summary"] and (tmp_path / "gpu_tests.log").is_file()
    assert "test_inductor_compiled_block_on_cuda" in (tmp_path / "gpu_tests.log").read_text()
    md = (tmp_path / "bench_gpu.md").read_text()
    assert md.startswith("# GPU benchmark: dry run on CPU") and "## GPU tests" in md and "| debug | dense | off |" in md


def test_gpu_check_refuses_torch_wheels_and_a_machine_without_cuda(tmp_path):
    (tmp_path / "torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"")
    res = _check("--wheels", tmp_path, timeout=60)
    assert res.returncode == 2 and "machine's own torch" in res.stderr
    if not torch.cuda.is_available():
        res = _check("--out", tmp_path / "out", timeout=120)
        assert res.returncode == 2 and "sees no CUDA GPU" in res.stderr and not (tmp_path / "out").exists()
