"""The run directory (issue 23, items 1-2): a new run refuses a directory that holds one, a run holds a
lock that a second run cannot take (a dead holder's lock is taken over), and pruning deletes only the
checkpoints this run wrote."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO, debug_overrides

from transfusion_mot.components.resume import prune
from transfusion_mot.components.rundir import RunDirError
from transfusion_mot.config import load_config
from transfusion_mot.train import train

DEBUG = str(REPO / "configs" / "debug.yaml")


def _train(out, *extra):
    return train(load_config(DEBUG, debug_overrides(out, "train.save_every=1", *extra)), evaluate_at_end=False)


def test_new_run_in_a_run_dir_refuses_and_overwrite_starts_over(tmp_path, debug_vae, capsys):
    run = tmp_path / "run"
    _train(run, "train.steps=2")
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(RunDirError, match=r"is not empty.*--resume auto.*--overwrite") as refused:
        _train(run, "train.steps=1")
    assert str(run) in str(refused.value)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing touched
    _train(run, "train.steps=1", "train.overwrite=true")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000001"]  # the old run is gone
    assert "--overwrite: removed" in capsys.readouterr().out


def test_second_run_refuses_while_the_first_holds_the_lock(tmp_path, debug_vae, capsys):
    run = tmp_path / "run"
    first = [sys.executable, "-m", "transfusion_mot.train", "--config", DEBUG, "--no-eval",
             *debug_overrides(run, "train.steps=100000", "train.log_every=1", "train.save_every=0")]
    holder = subprocess.Popen(first, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while "loss_lm" not in ((run / "metrics.jsonl").read_text() if (run / "metrics.jsonl").exists() else ""):
            assert time.time() < deadline and holder.poll() is None, "the first run did not start training"
            time.sleep(0.2)
        with pytest.raises(RunDirError) as refused:
            _train(run, "train.steps=1", "train.resume=auto")
        assert f"pid {holder.pid} on host {socket.gethostname()}" in str(refused.value)
        assert not (run / "checkpoints").exists()  # the second run wrote nothing
    finally:
        holder.kill()
        holder.wait()
    _train(run, "train.steps=1", "train.resume=auto")  # the holder died: its lock is free
    assert f"took over the stale lock of pid {holder.pid}" in capsys.readouterr().out


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, debug_vae, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(json.dumps({"pid": 999999, "host": "elsewhere", "since": "yesterday"}))
    _train(run, "train.steps=1")
    assert "took over the stale lock of pid 999999 on host elsewhere" in capsys.readouterr().out
    assert (run / "checkpoints" / "step_000001").is_dir()
    assert (run / ".lock").read_text() == ""  # released at the end


def _fake_checkpoint(run, step, run_id, good=True):
    folder = run / "checkpoints" / f"step_{step:06d}"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"step": step, "files": {}, "run_id": run_id, "good": good}))


def test_pruning_deletes_only_this_runs_checkpoints_and_keeps_the_last_good_one(tmp_path):
    for step, run_id, good in [(2, "mine", True), (4, "mine", True), (6, "mine", False), (8, "mine", False),
                               (15, "other", True), (20, "other", True)]:
        _fake_checkpoint(tmp_path, step, run_id, good)
    (tmp_path / "checkpoints" / "step_000030").mkdir()  # no manifest: not known to be ours
    gone = prune(tmp_path, "mine", keep=2)
    assert sorted(p.name for p in gone) == ["step_000002"]
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left == ["step_000004", "step_000006", "step_000008", "step_000015", "step_000020", "step_000030"]
