"""Kill-and-resume soak (issue 23, "Must show"): a run SIGKILLed at random moments during checkpoint saves,
in-run evaluation, export and plain steps (more than 10 kills), resumed with --resume auto each time,
ends bit-identical to the same run left alone: every logged loss, gradient norm, learning rate and
validation number, and the exported weights. Slow (a dozen process starts); .ci/run runs it."""
import json
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, debug_overrides
from safetensors.torch import load_file

DEBUG = str(REPO / "configs" / "debug.yaml")
STEPS, LAST_MIDDLE = 24, 14  # save every 2 and evaluate every 3 steps

# The run, with a marker printed when each phase starts; save, eval and export are stretched a little
# (sleeps inside them) so that a kill a random fraction of a second after the marker lands inside them.
SOAK = textwrap.dedent("""
    import sys, time
    from transfusion_mot import evaluate, train
    from transfusion_mot.components import checkpoint, resume

    def marked(name, fn, pause=0.0):
        def wrapped(*args, **kwargs):
            if name:
                print(name, flush=True)
            time.sleep(pause)
            return fn(*args, **kwargs)
        return wrapped

    resume.save_checkpoint = marked("SAVE", resume.save_checkpoint)
    checkpoint._write_rng = marked("", checkpoint._write_rng, 0.1)      # between the shards and the manifest
    checkpoint._replace_dir = marked("", checkpoint._replace_dir, 0.1)  # before a checkpoint or export rename
    evaluate.Evaluator.validation = marked("EVAL", evaluate.Evaluator.validation, 0.1)
    train.export_model = marked("EXPORT", train.export_model, 0.1)
    train.train_step = marked("STEP", train.train_step)
    log_step = train.log_step
    def logged(run, engine, state, *args):
        log_step(run, engine, state, *args)
        print("AT", state.step, flush=True)
    train.log_step = logged
    train.main(sys.argv[1:])
""")


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}


def _args(run: Path) -> list[str]:
    return ["--config", DEBUG, "--no-eval",
            *debug_overrides(run, f"train.steps={STEPS}", "train.log_every=1", "train.save_every=2", "train.eval_every=3",
                             "train.keep_checkpoints=2", "train.ema_decay=0.9")]


def _plan(rng: random.Random) -> list[tuple[str, int, float]]:
    """(marker, the step it must come after, seconds after it) for each kill, in run order.

    A kill lands on the first marker that follows a logged step >= its step, so it never depends on how far
    the previous launches got; the middle kills all come after steps <= LAST_MIDDLE, and a kill there leaves
    a checkpoint a few steps later at most, well short of STEPS, so no launch finishes the run early."""
    kinds = [("SAVE", 0.35)] * 4 + [("EVAL", 0.3)] * 3 + [("STEP", 0.5)] * 2
    rng.shuffle(kinds)
    after = sorted(rng.randint(1, LAST_MIDDLE) for _ in kinds)
    middle = [(marker, step, rng.uniform(0, pause)) for (marker, pause), step in zip(kinds, after)]
    return middle + [("EXPORT", 0, rng.uniform(0, 0.25)) for _ in range(3)]


def _launch(run: Path, resume: bool) -> subprocess.Popen:
    cmd = [sys.executable, "-c", SOAK, *_args(run)] + (["--resume", "auto"] if resume else [])
    return subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def _rows(run: Path) -> tuple[list, list]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows if "loss_lm" in r]
    return train_rows, [r for r in rows if "val_flow" in r]


@pytest.mark.slow
def test_sigkill_soak_resumes_bit_exactly(tmp_path, debug_vae):
    reference = tmp_path / "reference"
    subprocess.run([sys.executable, "-c", SOAK, *_args(reference)], env=_env(), cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    run, kills = tmp_path / "run", []
    for marker, after, delay in _plan(random.Random(0)):
        proc, step, killed = _launch(run, resume=bool(kills)), -1, False
        for line in proc.stdout:
            if line.startswith("AT "):
                step = int(line.split()[1])
            if line.strip() == marker and (step >= after or marker == "EXPORT"):
                time.sleep(delay)
                proc.kill()
                killed = True
                break
        proc.wait(timeout=600)
        assert killed, f"the run ended before its planned kill ({marker} after step {after})"
        kills.append(marker)
    final = _launch(run, resume=True)
    final.communicate(timeout=600)
    assert final.returncode == 0
    assert len(kills) >= 10 and {"SAVE", "EVAL", "EXPORT", "STEP"} <= set(kills), kills
    assert _rows(run) == _rows(reference)  # every loss, grad norm, lr and validation number, bit for bit
    a, b = load_file(reference / "model" / "model.safetensors"), load_file(run / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
