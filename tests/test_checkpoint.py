"""Checkpoints that are safe and verified (issue 23, items 4-7): nothing is unpickled on resume, a manifest
is checked and resume falls back to the newest checkpoint that verifies, the config is compared with the
checkpoint's, and non-finite gradients or weights never pass for good."""
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, debug_overrides
from safetensors.torch import load_file

from transfusion_mot import train as train_module
from transfusion_mot.components.checkpoint import (CheckpointError, Snapshot, TrainState, load_checkpoint,
                                                   save_checkpoint)
from transfusion_mot.components.optim import lr_at
from transfusion_mot.config import load_config
from transfusion_mot.train import Stop, train

DEBUG = str(REPO / "configs" / "debug.yaml")


def _cfg(out, *extra, check=True):
    return load_config(DEBUG, debug_overrides(out, "train.log_every=1", *extra), check=check)


def _train(out, *extra):
    return train(_cfg(out, *extra), evaluate_at_end=False)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run4(tmp_path_factory, debug_vae):
    """A finished 4-step run with checkpoints at steps 2 and 4 (EMA on)."""
    out = tmp_path_factory.mktemp("run4")
    _train(out, "train.steps=4", "train.save_every=2", "train.ema_decay=0.9")
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _resume(run: Path, *extra, steps: int = 6):
    return _train(run, f"train.steps={steps}", "train.save_every=2", "train.ema_decay=0.9", "train.resume=auto", *extra)


class Payload:
    """Unpickling this creates the marker file: proof that code from a checkpoint ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_pickle_in_a_checkpoint_never_runs(run4, tmp_path, capsys):
    run = _copy(run4, tmp_path)
    marker = tmp_path / "PWNED"
    newest = run / "checkpoints" / "step_000004"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "state/.metadata"):  # accelerate's / DCP's names
        (newest / name).parent.mkdir(exist_ok=True)
        (newest / name).write_bytes(pickle.dumps(Payload(marker)))
    try:
        _resume(run)
    finally:
        assert not marker.exists(), "resuming ran code from the checkpoint"
    out = capsys.readouterr().out
    assert "skipped step_000004: holds" in out and "pickle" in out
    assert f"resumed from {run / 'checkpoints' / 'step_000002'} at step 2" in out


class _OneProcess:
    """What save/load ask of the engine, for one process without accelerate."""

    is_main_process, process_index, num_processes, device = True, 0, 1, torch.device("cpu")

    def wait_for_everyone(self):
        pass


def test_dcp_reader_never_opens_a_metadata_pickle(tmp_path):
    """DCP's default reader unpickles ``.metadata``; the safetensors reader used here reads headers only."""
    from helpers import debug_model, mixed_batch

    from transfusion_mot import flow

    model, cfg = debug_model(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    flow.loss_parts(model, mixed_batch(), cfg.flow, 0).total(5.0).backward()
    opt.step()
    snap = Snapshot(model, opt, None, TrainState(step=1))
    ckpt = save_checkpoint(_OneProcess(), tmp_path, snap, cfg, {"run_id": "x", "good": True})
    marker = tmp_path / "PWNED"
    (ckpt / "state" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    fresh, _ = debug_model(seed=1)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    load_checkpoint(_OneProcess(), ckpt, Snapshot(fresh, fresh_opt, None, TrainState()), with_ema=False)
    assert not marker.exists()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
    pairs = zip(model.parameters(), fresh.parameters())
    assert all(torch.equal(opt.state[a]["exp_avg"], fresh_opt.state[b]["exp_avg"]) for a, b in pairs)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,expect,resumed", [
    ("flipped", "does not match its sha256", "step_000002"),
    ("truncated", "truncated", "step_000002"),
    ("manifest", "no readable manifest.json", "step_000002"),
    ("empty", "ignoring", "step_000004"),
])
def test_resume_verifies_and_falls_back(run4, tmp_path, capsys, damage, expect, resumed):
    run = _copy(run4, tmp_path)
    files = [p for p in (run / "checkpoints" / "step_000004").rglob("*") if p.is_file()]
    shard = max(files, key=lambda p: p.stat().st_size)  # the weights and moments
    if damage == "flipped":
        _flip_byte(shard)
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif damage == "manifest":
        (run / "checkpoints" / "step_000004" / "manifest.json").unlink()
    else:
        (run / "checkpoints" / "step_000006").mkdir()
    _resume(run, steps=5)  # no traceback: the damaged or empty checkpoint is skipped with its reason
    out = capsys.readouterr().out
    assert expect in out, out
    assert f"resumed from {run / 'checkpoints' / resumed} at step {int(resumed[-1])}" in out, out
    assert [r["step"] for r in _rows(run) if "loss_lm" in r] == [1, 2, 3, 4, 5]


def test_resume_refuses_model_and_data_changes(run4, tmp_path):
    run = _copy(run4, tmp_path)
    with pytest.raises(CheckpointError, match=r"model\.backbone\.dim: 64 -> 32"):
        _resume(run, "model.dim=32")
    with pytest.raises(CheckpointError, match=r"global batch \(processes x data\.batch_size\): 1 x 4 -> 1 x 2.*"
                                              r"--allow-config-change"):
        _resume(run, "data.batch_size=2")


def test_resume_applies_allowed_and_optimizer_changes(run4, tmp_path, capsys):
    run = _copy(run4, tmp_path)
    _resume(run, "data.batch_size=2", "train.allow_config_change=true", "optim.lr=2e-3")
    change = next(r for r in _rows(run) if "config_change" in r)
    assert change["step"] == 4 and change["allow_config_change"] is True
    assert change["config_change"]["data"] == ["global batch (processes x data.batch_size): 1 x 4 -> 1 x 2"]
    assert any(c.startswith("optim.lr: 0.001 -> 0.002") for c in change["config_change"]["applied"])
    cfg = _cfg(run, "optim.lr=2e-3", "train.steps=6")
    lrs = {r["step"]: r["lr"] for r in _rows(run) if "loss_lm" in r}
    assert lrs[5] == pytest.approx(lr_at(5, cfg.optim, 6))  # the new schedule from the resumed step on
    state = json.loads((run / "checkpoints" / "step_000006" / "train_state.json").read_text())
    assert state["next_batch"] == 8 + 2  # 4 batches of 4 seen = 8 batches of 2; then 2 more steps


def test_a_checkpoint_of_the_old_names_and_flat_config_resumes(run4, tmp_path, debug_vae, monkeypatch):
    """Checkpoints written before issue 21 item 1 (parameters tok_emb, lm_head, patch_*, t_emb; flat backbone
    keys and model.n_modalities in config.yaml) resume and continue exactly as today's do."""
    from transfusion_mot.config import Config
    from transfusion_mot.model.transfusion import LEGACY_NAMES

    def old_name(key: str) -> str:
        section, _, name = key.partition(".")
        for old, new in LEGACY_NAMES:
            if name.startswith(new):
                return f"{section}.{old}{name[len(new):]}"
        return key

    def flat_dict(cfg) -> dict:
        tree = new_dict(cfg)
        tree["model"] = {**{k: v for k, v in tree["model"].items() if k != "backbone"}, **tree["model"]["backbone"],
                         "n_modalities": 2}
        return tree

    new_tensors, new_dict = Snapshot.tensors, Config.to_dict
    with monkeypatch.context() as m:  # the old writer: old names, flat config
        m.setattr(Snapshot, "tensors", lambda self, **kw: {old_name(k): v for k, v in new_tensors(self, **kw).items()})
        m.setattr(Config, "to_dict", flat_dict)
        old_run = tmp_path / "old"
        _train(old_run, "train.steps=4", "train.save_every=2", "train.ema_decay=0.9")
    step4 = load_file(next((old_run / "checkpoints" / "step_000004" / "state").glob("*.safetensors")))
    assert "model.tok_emb.weight" in step4 and "optim.lm_head.weight.exp_avg" in step4 and "ema.patch_out.bias" in step4
    saved = (old_run / "checkpoints" / "step_000004" / "config.yaml").read_text()
    assert "  n_layers: 2" in saved and "n_modalities: 2" in saved and "backbone" not in saved
    _resume(old_run)
    today = _copy(run4, tmp_path)
    _resume(today)
    losses = [[(r["step"], r["loss"]) for r in _rows(run) if "loss" in r and r["step"] > 4] for run in (old_run, today)]
    assert losses[0] == losses[1] and len(losses[0]) == 2


def _poison(monkeypatch, calls, grads: bool):
    """train_step that, at the given calls (1-based), leaves an inf gradient (or reports a NaN loss)."""
    original, n = train_module.train_step, {"calls": 0}

    def step(model, batches, cfg, engine, seed):
        losses = original(model, batches, cfg, engine, seed)
        n["calls"] += 1
        if n["calls"] in calls:
            if grads:  # the loss stays finite
                next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
            else:
                losses = {**losses, "loss": float("nan")}
        return losses

    monkeypatch.setattr(train_module, "train_step", step)


def test_nonfinite_gradient_norm_skips_the_step(tmp_path, debug_vae, monkeypatch):
    _poison(monkeypatch, {2}, grads=True)
    run = _train(tmp_path / "run", "train.steps=3", "train.save_every=0")
    last = [r for r in _rows(run) if "loss_lm" in r][-1]
    assert last["step"] == 3 and last["skipped_steps"] == 1 and last["nonfinite_grads"] == 1
    weights = load_file(run / "model" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_stop_names_a_real_good_checkpoint(tmp_path, debug_vae, monkeypatch):
    _poison(monkeypatch, range(3, 100), grads=False)  # steps 1-2 fine, then NaN losses
    with pytest.raises(Stop) as stop:
        _train(tmp_path / "run", "train.steps=20", "train.save_every=1", "train.max_bad_steps=2")
    good = tmp_path / "run" / "checkpoints" / "step_000002"
    assert f"The last good checkpoint is {good}" in str(stop.value) and good.is_dir()


def test_stop_at_infinite_lr_says_there_is_no_good_checkpoint(tmp_path, debug_vae):
    cfg = _cfg(tmp_path / "run", "train.steps=20", "train.save_every=1", "train.max_bad_steps=2", "optim.lr=inf",
               check=False)
    with pytest.raises(Stop) as stop:
        train(cfg, evaluate_at_end=False)
    assert "No checkpoint with finite weights and loss was saved" in str(stop.value)
    manifests = [json.loads(p.read_text()) for p in (tmp_path / "run" / "checkpoints").glob("*/manifest.json")]
    assert manifests and not any(m["good"] for m in manifests)  # saved, and marked as not good
