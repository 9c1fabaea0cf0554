"""Precision has one source of truth (issue 19, item 5): ``train.mixed_precision=auto`` follows accelerate's
``--mixed_precision`` (the launcher exports it as ACCELERATE_MIXED_PRECISION), an explicit config value that
contradicts the launcher refuses, and bf16 and fp16 (with its loss scale) train on CPU close to fp32."""
import json

import pytest
from conftest import REPO, debug_overrides

from transfusion_mot.config import ConfigError, load_config
from transfusion_mot.train import train

DEBUG = str(REPO / "configs" / "debug.yaml")


def _run(out, *extra):
    cfg = load_config(DEBUG, debug_overrides(out, "train.log_every=1", "train.save_every=2", "train.steps=2", *extra))
    return train(cfg, evaluate_at_end=False)


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _first_loss(run) -> float:
    return next(r["loss"] for r in _rows(run) if "loss_lm" in r)


def test_launcher_precision_is_followed_and_a_contradiction_refuses(tmp_path, debug_vae, monkeypatch):
    fp32 = _first_loss(_run(tmp_path / "fp32"))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # accelerate launch --mixed_precision bf16
    run = _run(tmp_path / "bf16")
    assert next(r["setup"]["precision"] for r in _rows(run) if "setup" in r) == "bf16"
    assert abs(_first_loss(run) - fp32) < 0.02 * fp32  # the same step under bf16 autocast
    with pytest.raises(ConfigError, match="train.mixed_precision=fp16 but accelerate launch says --mixed_precision bf16"):
        _run(tmp_path / "fp16", "train.mixed_precision=fp16")
    assert not (tmp_path / "fp16").exists()  # refused before anything was written


def test_fp16_trains_with_a_loss_scale(tmp_path, debug_vae):
    run = _run(tmp_path / "fp16", "train.mixed_precision=fp16")
    rows = [r for r in _rows(run) if "loss_lm" in r]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] == r["loss"] for r in rows)
    state = json.loads((run / "checkpoints" / "step_000002" / "train_state.json").read_text())
    assert state["precision"] == "fp16" and 0 < state["scaler"]["scale"] <= 2.0 ** 16


def test_fsdp1_launch_config_is_refused(monkeypatch):
    from transfusion_mot.components.parallel import resolve_parallel

    cfg = load_config(DEBUG)
    assert resolve_parallel(cfg, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}) == "fsdp"
    assert resolve_parallel(cfg, {}) == "ddp"
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        resolve_parallel(cfg, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"})
