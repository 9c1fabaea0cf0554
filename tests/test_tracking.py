"""Tracking (issue 22 #3): ``train.report_to`` through accelerate's trackers; a debug run's TensorBoard event
files hold its hyperparameters, loss / lr / tokens-per-second scalars, the per-t validation losses and the
sample grid as an image (read back with TensorBoard's own event reader); train.log holds what it printed."""
from __future__ import annotations

import importlib.util

import pytest
from conftest import REPO, debug_overrides

from transfusion_mot.config import ConfigError, load_config
from transfusion_mot.train import train


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_debug_run_writes_scalars_hparams_images_and_a_text_log(tmp_path, debug_vae):
    cfg = load_config(str(REPO / "configs" / "debug.yaml"),
                      debug_overrides(tmp_path / "run", "train.steps=4", "train.log_every=2", "train.sample_every=2",
                                      "train.eval_every=2", "eval.n_prompts=2"))
    run = train(cfg)
    tb = run / "tb"
    acc = _events(tb)
    tags = acc.Tags()
    for tag in ("loss", "loss_lm", "loss_flow", "lr", "tokens_per_s", "grad_norm", "val_flow", "val_flow_t0.125"):
        assert tag in tags["scalars"], (tag, tags["scalars"])
    assert [e.step for e in acc.Scalars("loss_lm")] == [2, 4]
    assert "samples" in tags["images"]
    images = acc.Images("samples")
    assert [e.step for e in images] == [2, 4]  # the grid at sample_every, then the final grid
    assert images[0].encoded_image_string[:4] == b"\x89PNG" and images[0].width > 32
    from tensorboard.plugins.hparams import plugin_data_pb2

    (session,) = [p for p in tb.iterdir() if p.is_dir() and any(p.glob("events.out.tfevents.*"))]  # add_hparams'
    assert "model.backbone.dim: 64" in next(tb.rglob("hparams.yml")).read_text()  # accelerate's copy, beside it
    content = _events(session).PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hp = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hp["model.backbone.dim"].number_value == 64 and hp["train.report_to"].string_value == "tensorboard"
    assert hp["codec.vae_channels"].string_value == str(cfg.codec.vae_channels)  # sequences as text
    log = (run / "train.log").read_text()
    assert "debug: mot model" in log and "step 2: loss " in log and "step 4: loss " in log
    assert "prompt-following" in log or "val" in log  # the final summary the console shows


def test_report_to_none_writes_no_events_and_wandb_is_never_required(tmp_path):
    with pytest.raises(ConfigError, match="train.report_to='mlflow'"):
        load_config(str(REPO / "configs" / "debug.yaml"), ["train.report_to=mlflow"])
    if importlib.util.find_spec("wandb") is None:
        cfg = load_config(str(REPO / "configs" / "debug.yaml"),
                          debug_overrides(tmp_path / "wb", "train.report_to=wandb"))
        with pytest.raises(ValueError, match="train.report_to=wandb but wandb is not installed: pip install wandb"):
            train(cfg)
        assert not (tmp_path / "wb").exists()  # stopped before the run dir was touched


def test_paper_configs_validate_and_sample_during_training():
    import yaml

    for path in sorted((REPO / "configs").glob("paper_*.yaml")):
        train_cfg = yaml.safe_load(path.read_text())["train"]
        assert train_cfg["eval_every"] > 0 and train_cfg["sample_every"] > 0, path.name
        assert train_cfg.get("report_to", "tensorboard") == "tensorboard", path.name
