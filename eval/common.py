"""What every eval script and benchmark shares: machine facts, the commit, timing, and writing
``eval/results/<name>.json`` + ``.md`` (the json is the record, the markdown is for people)."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]


def commit() -> str:
    """HEAD's hash, with ``+dirty`` when the tree has uncommitted changes to tracked files."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "") if head else "unknown"
    except OSError:
        return "unknown"


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    info["device"] = info.get("gpu", f"CPU ({info['cpus']} cores)")
    return info


def command() -> str:
    return " ".join(["python", *[a if " " not in a else repr(a) for a in sys.argv]])


def median_time(fn, reps: int, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` over ``reps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def md_table(rows: list[dict], columns: list[str] | None = None, digits: int = 4) -> str:
    columns = columns or list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.{digits}g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, data: dict, markdown: str, out_dir: Path | None = None) -> Path:
    """``<out_dir>/<name>.json`` (with machine, commit, command) and ``<name>.md``."""
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"name": name, "commit": commit(), "command": command(), "machine": machine(), **data}
    (out_dir / f"{name}.json").write_text(json.dumps(record, indent=2, default=str))
    header = (f"_commit `{record['commit']}` · {record['machine']['device']} · torch {record['machine']['torch']}_\n\n"
              f"```\n{record['command']}\n```\n\n")
    (out_dir / f"{name}.md").write_text(markdown.replace("{header}", header) if "{header}" in markdown
                                        else header + markdown)
    return out_dir / f"{name}.json"
