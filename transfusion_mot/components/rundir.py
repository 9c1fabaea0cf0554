"""The run directory: who owns it and what a new run may do with it (resume rules: resume.py).

- A run holds an exclusive lock on ``<run dir>/.lock`` (``fcntl.flock``, released by the OS when the
  process dies, so a stale lock from a dead process is taken over safely); a second run on the same
  directory refuses, naming the holder's pid and host.
- A new run refuses a non-empty directory (``--resume auto`` continues it, ``--overwrite`` deletes
  the files a run writes there first).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

LOCK = ".lock"
RUN_FILES = ("checkpoints", "model", "model.tmp", "vae", "vae.tmp", "metrics.jsonl", "config.yaml", "results.json",
             "report.md", "loss_curves.png", "tb", "train.log")


class RunDirError(ValueError):
    """The run directory cannot be used as asked: the message names it and what to do."""


class RunLock:
    """An exclusive advisory lock on one file; the file records the holder (pid, host, since)."""

    def __init__(self, path: Path):
        self.path, self.fd = path, None

    def acquire(self) -> str | None:
        """Take the lock or raise RunDirError naming its holder; returns a note when a stale one was taken over."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(self.path)
            os.close(fd)
            raise RunDirError(f"{self.path.parent} is in use by {holder}: wait for that run to end or use "
                              f"another train.out_dir") from None
        stale = _holder(self.path) if self.path.stat().st_size else None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self.fd = fd
        return f"took over the stale lock of {stale} (that process is gone)" if stale else None

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # an empty lock file: released cleanly, nothing stale
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on host {info['host']} (since {info.get('since', '?')})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its lock file is unreadable)"


@contextlib.contextmanager
def claim(run_dir: Path, train_cfg, engine):
    """Hold the run dir for the run: lock it and check that a new run may start there (main process;
    every rank gets the same verdict). Raises RunDirError before anything is written."""
    lock, error = RunLock(run_dir / LOCK), None
    if engine.is_main_process:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            note = lock.acquire()
            if note:
                engine.print(note)
            _check_new_run(run_dir, train_cfg, engine.print)
        except (RunDirError, OSError) as e:
            lock.release()
            error = str(e) if isinstance(e, RunDirError) else f"train.out_dir={run_dir}: {e}"
    error = broadcast(engine, error)
    if error:
        raise RunDirError(error)
    try:
        yield
    finally:
        lock.release()


def _check_new_run(run_dir: Path, train_cfg, say) -> None:
    """A new run (no train.resume) needs an empty run dir, or ``train.overwrite`` to clear a run's files."""
    if train_cfg.resume:
        return
    entries = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK)
    if not entries:
        return
    if not train_cfg.overwrite:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise RunDirError(f"train.out_dir={run_dir} is not empty ({shown}): continue that run with --resume auto "
                          f"(train.resume=auto), or start over with --overwrite (train.overwrite=true)")
    removed = [p for p in run_dir.iterdir() if p.name in RUN_FILES or p.name.startswith("samples_")]
    for p in removed:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    say(f"--overwrite: removed {', '.join(sorted(p.name for p in removed)) or 'nothing'} from {run_dir}")


def broadcast(engine, value):
    """The main process's value on every rank (a small object of our own; never read from a file)."""
    if engine.num_processes == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]
