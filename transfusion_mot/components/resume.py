"""Saving and resuming a run: which checkpoint a resume takes, which config changes it accepts, which
checkpoints pruning may delete, and what the stop message calls the last good checkpoint.

- Resume verifies checkpoints newest first (``checkpoint.verify``) and takes the first that verifies and
  whose weights and loss were finite, saying which it skipped and why; an empty ``step_N/`` is ignored.
- Config changes on resume: model keys refuse (the weights would not fit or would mean something else);
  data-order keys (``data.*``, ``codec.*``, ``train.seed``, ``train.grad_accum``, processes x batch
  size) refuse unless ``--allow-config-change``; everything else applies from the resumed step: the
  optimizer's hyper-parameters and the learning-rate schedule are always the current config's (the
  schedule is a function of the step, rebuilt on resume; Adam's moments come from the checkpoint).
  Every difference is written to metrics.jsonl as a ``config_change`` row.
- Pruning deletes only checkpoints whose manifest carries this run's id, and never the newest good one.
"""
from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import torch
import yaml

from ..config import upgrade_saved
from .checkpoint import (CheckpointError, Snapshot, TrainState, list_checkpoints, load_checkpoint, read_manifest,
                         save_checkpoint, verify)
from .parallel import local
from .rundir import broadcast, new_run_id


class Checkpointer:
    """Saves and resumes one run's ``Snapshot`` (model, optimizer, EMA, counters) and schedule."""

    def __init__(self, cfg, engine, run_dir: Path, snap: Snapshot, sched, log):
        self.cfg, self.engine, self.run_dir, self.snap, self.sched, self.log = cfg, engine, run_dir, snap, sched, log
        self.run_id, self.last_saved = new_run_id(), -1

    def layout(self) -> dict:
        from ..data.pipeline import examples_per_batch

        return {"world_size": self.engine.num_processes, "batch_size": self.cfg.data.batch_size,
                "examples_per_batch": examples_per_batch(self.cfg)}

    def save(self) -> Path:
        engine, snap = self.engine, self.snap
        good = weights_finite(snap.model, engine) and math.isfinite(snap.state.last_loss)
        meta = {"run_id": self.run_id, "good": good, **self.layout(), "parallel": engine.mode,
                "precision": engine.precision, "ema": snap.ema is not None,
                "scaler": engine.scaler.state_dict() if engine.scaler is not None else None,
                "optimizer": [{k: v for k, v in g.items() if k != "params"} for g in snap.optimizer.param_groups]}
        snap.state.ema_updates = snap.ema.updates if snap.ema is not None else 0
        path = save_checkpoint(engine, self.run_dir, snap, self.cfg, json.loads(json.dumps(meta, default=str)))
        if engine.is_main_process:
            prune(self.run_dir, self.run_id, self.cfg.train.keep_checkpoints)
        engine.wait_for_everyone()
        self.last_saved = snap.state.step
        return path

    def resume(self) -> None:
        """Load the checkpoint ``train.resume`` names (if any), after checking the config against it."""
        engine, cfg, snap = self.engine, self.cfg, self.snap
        ckpt = choose_checkpoint(engine, self.run_dir, cfg.train.resume)
        if ckpt is None:
            if engine.is_main_process:
                self.log.path.unlink(missing_ok=True)
            return
        meta = json.loads((ckpt / "train_state.json").read_text())
        saved_cfg = yaml.safe_load((ckpt / "config.yaml").read_text())
        changes = config_changes(upgrade_saved(saved_cfg), cfg.to_dict(), meta, self.layout())
        check_resume_config(ckpt, changes, cfg.train.allow_config_change)
        with_ema = bool(meta.get("ema")) and snap.ema is not None
        load_checkpoint(engine, ckpt, snap, with_ema)
        snap.state = TrainState.from_json(meta)
        if snap.ema is not None:
            snap.ema.updates = snap.state.ema_updates if with_ema else 0
        if engine.scaler is not None and meta.get("scaler"):
            engine.scaler.load_state_dict(meta["scaler"])
        old_global = meta.get("world_size", 1) * meta.get("examples_per_batch", 0)
        new_global = engine.num_processes * self.layout()["examples_per_batch"]
        if old_global and old_global != new_global:  # allowed above: continue after the examples already seen
            snap.state.next_batch = math.ceil(snap.state.next_batch * old_global / new_global)
        restore_schedule(self.sched, snap.state.step)
        newest = list_checkpoints(self.run_dir)[:1] == [ckpt]
        self.run_id = meta.get("run_id", self.run_id) if newest else self.run_id  # an older one: a new branch
        self.last_saved = snap.state.step
        self.log.truncate_after(snap.state.step)
        if any(changes.values()):
            self.log.write({"step": snap.state.step, "config_change": changes,
                            "allow_config_change": cfg.train.allow_config_change})
            for text in changes["applied"] + changes["data"]:
                engine.print(f"config change on resume: {text}")
        engine.print(f"resumed from {ckpt} at step {snap.state.step}")


def weights_finite(model: torch.nn.Module, engine) -> bool:
    bad = sum(int(not torch.isfinite(local(p)).all()) for p in model.parameters())
    return float(engine.reduce(torch.tensor(float(bad), device=engine.device), "sum")) == 0


def restore_schedule(sched, step: int) -> None:
    """Put the lr schedule at ``step`` through its own code path (same float ops as an unbroken run)."""
    sched.last_epoch = step - 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": intended here
        sched.step()


# --------------------------------------------------------------------------------------------------
# Which checkpoint to resume, which to prune, which was the last good one
# --------------------------------------------------------------------------------------------------
def choose_checkpoint(engine, run_dir: Path, resume: str) -> Path | None:
    """'' -> None; 'auto' -> the newest checkpoint that verifies and was good (None when there is none
    at all); a path -> that checkpoint, verified. Skipped checkpoints are named with the reason."""
    if not resume:
        return None
    explicit = resume != "auto"
    if explicit:
        path = Path(resume)
        if not path.is_dir() or path.name.endswith(".tmp"):
            raise CheckpointError(f"train.resume={resume}: not a checkpoint folder")
        candidates = [path]
    else:
        candidates = broadcast(engine, list_checkpoints(run_dir))
    skipped = []
    for ckpt in candidates:
        if not explicit and not any(ckpt.iterdir()):
            engine.print(f"ignoring {ckpt}: an empty folder")
            continue
        problem = verify(ckpt, engine)
        if problem is None and not (read_manifest(ckpt) or {}).get("good", True):
            problem = "its weights or last loss were not finite"
            if explicit:
                engine.print(f"warning: {ckpt} {problem}; resuming it as asked")
                problem = None
        if problem is None:
            for name, why in skipped:
                engine.print(f"skipped {name}: {why}")
            if skipped:
                engine.print(f"resuming from {ckpt.name}, the newest checkpoint that verifies")
            return ckpt
        if explicit:
            raise CheckpointError(f"train.resume={resume}: the checkpoint {problem}")
        skipped.append((ckpt.name, problem))
    if skipped:
        raise CheckpointError(f"no checkpoint in {run_dir / 'checkpoints'} can be resumed ("
                              + "; ".join(f"{n} {w}" for n, w in skipped)
                              + "): start over with --overwrite, or resume a folder with train.resume=PATH")
    return None


def prune(run_dir: Path, run_id: str, keep: int) -> list[Path]:
    """Delete this run's checkpoints beyond the newest ``keep``, keeping the newest good one too."""
    if keep <= 0:
        return []
    mine = [(c, m) for c in list_checkpoints(run_dir) if (m := read_manifest(c)) and m.get("run_id") == run_id]
    kept = {c for c, _ in mine[:keep]} | {next((c for c, m in mine if m.get("good")), None)}
    gone = [c for c, _ in mine if c not in kept]
    for c in gone:
        shutil.rmtree(c, ignore_errors=True)
    return gone


def last_good(engine, run_dir: Path) -> str:
    """Words for the stop message: the newest checkpoint with finite weights and loss that verifies."""
    for ckpt in broadcast(engine, list_checkpoints(run_dir)):
        manifest = read_manifest(ckpt)
        if manifest and manifest.get("good") and verify(ckpt, engine) is None:
            return f"The last good checkpoint is {ckpt} (finite weights and loss); --resume auto continues from it."
    return f"No checkpoint with finite weights and loss was saved in {run_dir / 'checkpoints'}."


# --------------------------------------------------------------------------------------------------
# Config changes on resume
# --------------------------------------------------------------------------------------------------
_IGNORED = {"train.resume", "train.overwrite", "train.allow_config_change", "train.out_dir", "train.stop_after"}
_APPLIED_MODEL = {"model.attention", "model.init_std", "model.moe_aux_weight", "model.size"}
_NOT_DATA = {"data.num_workers", "data.cache_latents", "data.val_path", "codec.cache_dir"}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def config_changes(saved: dict, now: dict, saved_layout: dict, now_layout: dict) -> dict[str, list]:
    """{'model' | 'data' | 'applied': ['key: old -> new', ...]} between a checkpoint and this run. A key the
    checkpoint's config does not have (added since) counts as its default: a new option's default keeps the
    old behaviour, so only a non-default value is a change."""
    from ..config import Config

    old, new = _flat(saved), _flat(now)
    old.update({k: v for k, v in _flat(Config().to_dict()).items() if k in new and k not in old})
    out: dict[str, list] = {"model": [], "data": [], "applied": []}
    for key in sorted(set(old) | set(new)):
        if key in _IGNORED or key == "data.batch_size" or old.get(key) == new.get(key):  # batch: see below
            continue
        text = f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        if key.startswith("model.") and key not in _APPLIED_MODEL:
            out["model"].append(text)
        elif key.startswith(("data.", "codec.", "train.seed", "train.grad_accum")) and key not in _NOT_DATA:
            out["data"].append(text)
        else:
            out["applied"].append(text)
    w0, b0 = saved_layout.get("world_size", 1), saved_layout.get("batch_size", old.get("data.batch_size"))
    w1, b1 = now_layout["world_size"], now_layout["batch_size"]
    if w0 * b0 != w1 * b1:  # the data order depends on processes x batch size only
        out["data"].append(f"global batch (processes x data.batch_size): {w0} x {b0} -> {w1} x {b1}")
    elif (w0, b0) != (w1, b1):
        out["applied"].append(f"processes x data.batch_size: {w0} x {b0} -> {w1} x {b1} (the same global batch "
                              f"of {w0 * b0}: the same data order; the shards are re-split on load)")
    return out


def check_resume_config(ckpt: Path, changes: dict, allow: bool) -> None:
    if changes["model"]:
        raise CheckpointError(f"cannot resume {ckpt}: the model differs ({'; '.join(changes['model'])}); "
                              f"a different model needs a new train.out_dir")
    if changes["data"] and not allow:
        raise CheckpointError(f"resuming {ckpt} would change the data order ({'; '.join(changes['data'])}): "
                              f"pass --allow-config-change (train.allow_config_change=true) to accept it")
