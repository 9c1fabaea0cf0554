"""The GPU check in one go (issue 19): on a machine with one CUDA GPU, no network and its own preinstalled
torch, run the GPU tests (tests/test_gpu.py, tests/test_masks.py) and then eval/benchmarks/bench_gpu.py, inside a time
budget (default 7.5 minutes in all), and write eval/results/bench_gpu.{json,md} naming the device, with the
tests' outcome in them.

Nothing is installed here: the project runs from this checkout (PYTHONPATH) on the machine's own torch;
pure-Python packages it lacks travel as wheels (``eval/benchmarks/gpu_check.sh --wheels DIR``, which refuses torch).

    eval/benchmarks/gpu_check.sh [--budget-s 450] [--out eval/results] [--wheels DIR]
    eval/benchmarks/gpu_check.sh --dry-run [--out DIR]   # on a CPU: every step but CUDA's (tests collected, tiny bench)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "eval" / "results"
# What the package, the GPU tests and the benchmark import at the top (diffusers etc. only load on demand).
REQUIRED = ["torch", "yaml", "numpy", "PIL", "scipy", "safetensors", "tqdm", "accelerate", "pytest"]
TESTS = ["tests/test_gpu.py", "tests/test_masks.py"]


def environment() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": cuda, "device": torch.cuda.get_device_name() if cuda else "CPU"}


def run_tests(dry: bool, timeout: float, out: Path) -> dict:
    """pytest over the GPU tests (on a CPU, collected only: their CUDA cases cannot run there)."""
    cmd = [sys.executable, "-m", "pytest", *TESTS, "-q", "-p", "no:cacheprovider", "-m", "not slow"]
    cmd += ["--collect-only"] if dry else ["-rs"]
    start = time.perf_counter()
    try:
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        log, code = res.stdout + res.stderr, res.returncode
    except subprocess.TimeoutExpired as e:
        log, code = f"{e.stdout or ''}{e.stderr or ''}\nstopped after {timeout:.0f} s (the check's time budget)", -1
    (out / "gpu_tests.log").write_text(log if isinstance(log, str) else log.decode())
    lines = [line for line in str(log).splitlines() if line.strip()]
    summary = next((line.strip("= ") for line in reversed(lines) if " in " in line and
                    any(w in line for w in ("passed", "failed", "error", "collected", "tests", "skipped"))),
                   lines[-1] if lines else "no output")
    return {"command": " ".join(["python", *cmd[1:]]), "returncode": code, "summary": summary,
            "seconds": round(time.perf_counter() - start, 1), "log": "gpu_tests.log"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="on a CPU: every step but CUDA's, at tiny sizes")
    p.add_argument("--budget-s", type=float, default=450.0, help="the whole check, tests and benchmark")
    p.add_argument("--test-budget-s", type=float, default=170.0, help="the tests' share of the budget")
    p.add_argument("--out", type=Path, default=None, help="default: eval/results (a temp folder for --dry-run)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    missing = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
    if missing:
        print(f"error: {sys.executable} lacks {', '.join(missing)}; carry them as wheels (eval/benchmarks/gpu_check.sh "
              "--wheels DIR), never torch itself", file=sys.stderr)
        return 2
    env = environment()
    print(f"python {env['python']}, torch {env['torch']} (CUDA {env['cuda']}), device: {env['device']}", flush=True)
    if not args.dry_run and not env["cuda_available"]:
        print(f"error: this torch ({env['torch']}) sees no CUDA GPU; run on the GPU machine, or --dry-run here",
              file=sys.stderr)
        return 2
    out = args.out or (Path(tempfile.gettempdir()) / "transfusion_mot_gpu_check" if args.dry_run else RESULTS)
    out.mkdir(parents=True, exist_ok=True)

    tests = run_tests(args.dry_run, min(args.test_budget_s, args.budget_s / 2), out)
    print(f"tests: {tests['summary']} ({tests['seconds']} s)", flush=True)
    left = args.budget_s - (time.perf_counter() - start)
    cmd = [sys.executable, str(REPO / "eval" / "benchmarks" / "bench_gpu.py"), "--out", str(out),
           "--budget-s", f"{max(left - 45, 0):.0f}"]
    cmd += ["--dry-run"] if args.dry_run else []
    try:
        bench = subprocess.run(cmd, cwd=REPO, timeout=max(left - 5, 1)).returncode
    except subprocess.TimeoutExpired:
        bench = -1  # bench_gpu rewrites its results after every job: what it measured is there
    result = out / "bench_gpu.json"
    if not result.is_file():
        print(f"error: eval/benchmarks/bench_gpu.py wrote no results (exit {bench})", file=sys.stderr)
        return 1
    sys.path.insert(0, str(REPO / "eval" / "benchmarks"))
    from bench_gpu import write

    payload = json.loads(result.read_text())
    payload["tests"] = tests
    payload["gpu_check"] = {"seconds": round(time.perf_counter() - start, 1), "budget_s": args.budget_s,
                            "bench_returncode": bench, "environment": env}
    write(payload, out)
    print(f"gpu check: {payload['gpu_check']['seconds']} s; wrote {out / 'bench_gpu.json'} and .md")
    return 0 if tests["returncode"] == 0 and bench == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
