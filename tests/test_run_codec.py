"""A run directory's own VAE (``run_dir/vae``) is keyed to its data like the VAE cache is: a VAE left by
another data set, resolution or VAE setting is refused before any work, naming what differs (issue 23 #3)."""
from __future__ import annotations

import json
import shutil
from unittest import mock

import pytest
import torch
from conftest import REPO

from transfusion_mot.config import load_config
from transfusion_mot.data import run_codec

DEBUG = str(REPO / "configs" / "debug.yaml")


def _cfg(run, *extra):
    return load_config(DEBUG, [f"train.out_dir={run}", "codec.vae_steps=1", "data.cache_latents=false", *extra])


@pytest.fixture(scope="module")
def run_with_vae(tmp_path_factory):
    """A run dir whose vae/ was made for the debug config (shapes at 32 px): one step on random pixels, with
    codec.json recording what the pipeline would have trained it for."""
    run = tmp_path_factory.mktemp("run")
    cfg = _cfg(run)
    records = run_codec.build_records(cfg.data, "train")
    with mock.patch.object(run_codec, "_vae_images", lambda *a, **k: lambda step: torch.rand(4, 3, 32, 32)):
        run_codec.prepare_codec(cfg, run, records=records)
    assert json.loads((run / "vae" / "codec.json").read_text())["name"] == records.name
    return run


def test_the_same_config_reuses_the_run_dirs_vae(run_with_vae):
    with mock.patch.object(run_codec, "train_codec_for", side_effect=AssertionError("trained again")):
        codec, _ = run_codec.prepare_codec(_cfg(run_with_vae), run_with_vae)
    assert codec.latent_channels == 4


@pytest.mark.parametrize("extra,named", [
    (["data.resolution=64", "model.latent_size=16"], "data.resolution: the VAE has 32, the config asks for 64"),
    (["data.shapes_train_size=100"], "the data (data.source / data.path)"),
    (["codec.vae_chroma_weight=5"], "codec.vae_chroma_weight"),
    (["codec.vae_lr=1e-3"], "codec.vae_lr: the VAE has 0.002, the config asks for 0.001"),
    (["train.seed=3"], "train.seed"),
])
def test_a_vae_for_other_data_or_settings_is_refused_before_work(run_with_vae, extra, named):
    with mock.patch.object(run_codec, "train_codec_for", side_effect=AssertionError("work started")):
        with pytest.raises(ValueError, match="holds a VAE trained for other data or settings") as err:
            run_codec.prepare_codec(_cfg(run_with_vae, *extra), run_with_vae)
    assert named in str(err.value) and str(run_with_vae / "vae") in str(err.value)


def test_codec_path_must_be_the_vae_the_run_dir_copied(run_with_vae, tmp_path):
    other = tmp_path / "other_vae"
    shutil.copytree(run_with_vae / "vae", other)
    assert run_codec.prepare_codec(_cfg(run_with_vae, f"codec.path={other}"), run_with_vae)  # the same VAE
    meta = json.loads((other / "codec.json").read_text())
    (other / "codec.json").write_text(json.dumps({**meta, "scaling_factor": 2.0}))
    with pytest.raises(ValueError, match="holds another VAE than codec.path"):
        run_codec.prepare_codec(_cfg(run_with_vae, f"codec.path={other}"), run_with_vae)


def test_codec_vae_lr_reaches_the_vae_training(tmp_path):
    seen = {}

    def fake_train(images, out, **kwargs):
        seen.update(kwargs)
        return out

    with mock.patch("transfusion_mot.data.vae_train.train_vae", side_effect=fake_train):
        run_codec.train_codec_for(_cfg(tmp_path, "codec.vae_lr=1e-3"), out=tmp_path / "vae")
    assert seen["lr"] == 1e-3
