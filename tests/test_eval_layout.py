"""eval/ split by kind (issue 22 #5): metrics/ (what a user runs to score a model), benchmarks/, experiments/
(what trains to answer a question), results/; eval/common.py serves them all. Every script starts from the
repo root as ``python eval/<kind>/<script>.py`` with nothing on PYTHONPATH for eval/."""
from __future__ import annotations

import subprocess
import sys

from conftest import REPO

EVAL = REPO / "eval"
KINDS = {
    "metrics": {"fid", "clip_score", "caption_cider", "val_loss", "prompt_following"},
    "benchmarks": {"bench_backbone", "bench_data", "bench_fsdp", "bench_gpu", "bench_sampling", "bench_stream_libs",
                   "bench_train", "gpu_check"},
    "experiments": {"compare_archs", "compare_archs_report", "vq_tokenizer"},
}

# One interpreter runs every script's --help as ``python eval/<kind>/<script>.py --help`` would (its own folder
# first on sys.path, __main__), so torch is imported once instead of once per script.
HELP_ALL = """
import runpy, sys
failed = []
for path in sys.argv[1:]:
    sys.argv, sys.path[0] = [path, "--help"], path.rsplit("/", 1)[0]
    try:
        runpy.run_path(path, run_name="__main__")
        failed.append(f"{path}: --help did not exit")
    except SystemExit as e:
        if e.code not in (0, None):
            failed.append(f"{path}: exit {e.code}")
    except Exception as e:
        failed.append(f"{path}: {type(e).__name__}: {e}")
print("\\n".join(failed) or "ok")
"""


def test_eval_holds_only_the_kinds_and_common():
    assert sorted(p.name for p in EVAL.iterdir() if not p.name.startswith((".", "__"))) == \
        ["benchmarks", "common.py", "experiments", "metrics", "results"]
    for kind, names in KINDS.items():
        assert {p.stem for p in (EVAL / kind).glob("*.py")} == names, kind
    assert (EVAL / "benchmarks" / "gpu_check.sh").is_file()


def test_every_script_starts_from_the_repo_root():
    scripts = [str((EVAL / kind / f"{name}.py").relative_to(REPO)) for kind, names in sorted(KINDS.items())
               for name in sorted(names) if name != "compare_archs_report"]  # a module of compare_archs, no main
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(REPO)  # the package (as an editable install gives it), not eval/
    res = subprocess.run([sys.executable, "-c", HELP_ALL, *scripts], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout[-3000:] + res.stderr[-3000:]
