"""Config values checked where they are set (issues 18.5 and 23.9/10): counters, the latent shape the
codec gives at data.resolution, the caption budget in data.seq_len and the sampling scheduler are one
ConfigError each in validate(), before any work; the latent shape is derived where the config tells it."""
import json

import pytest

from transfusion_mot.config import ConfigError, load_config


@pytest.mark.parametrize("override,message", [
    ("train.log_every=0", "train.log_every=0 must be >= 1"),  # used to divide by zero at the first step
    ("train.save_every=-1", "train.save_every=-1 must be >= 0"),
    ("train.eval_every=-5", "train.eval_every=-5 must be >= 0"),
    ("train.max_bad_steps=0", "train.max_bad_steps=0 must be >= 1"),
    ("eval.batch_size=0", "eval.batch_size=0 must be >= 1"),  # used to fail after training
    ("eval.n_prompts=0", "eval.n_prompts=0 must be >= 1"),
    ("eval.val_examples=0", "eval.val_examples=0 must be >= 1"),
    ("sample.n_per_prompt=0", "sample.n_per_prompt=0 must be >= 1"),
    ("sample.max_new_tokens=0", "sample.max_new_tokens=0 must be >= 1"),
    ("data.max_caption_tokens=0", "data.max_caption_tokens=0 must be >= 1"),
    ("data.num_workers=-1", "data.num_workers=-1 must be >= 0"),
    ("codec.vae_steps=0", "codec.vae_steps=0 must be >= 1"),
    ("sample.cfg_scale=.nan", "sample.cfg_scale=nan must be a finite number"),
    ("train.seed=-1", r"train.seed=-1 must lie in \[0, 2\*\*32\)"),
    ("model.arch=moe model.moe_capacity=0", r"model.moe_capacity=0.0 must lie in \(0, model.moe_experts=4\]"),
])
def test_counters_and_numbers_are_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override.split())


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "FlowMatchHeunDiscreteScheduler", "FlowMatchLCMScheduler"])
def test_schedulers_sampling_cannot_drive_are_refused(scheduler):
    """Sampling takes a scheduler's sigma grid and steps with Euler: a Heun scheduler ran as Euler with
    wasted calls, DDIM was accepted at training and failed at generate."""
    with pytest.raises(ConfigError, match=rf"sample.scheduler='{scheduler}' is not one of"):
        load_config(None, [f"sample.scheduler={scheduler}"])
    assert load_config(None, ["sample.scheduler=FlowMatchEulerDiscreteScheduler"]).sample.scheduler


def test_seq_len_counts_the_caption_budget():
    """layout() needs BOS + max_caption_tokens + BOI + patches + EOI + EOS; validate() used to count
    one caption token, so this config passed and failed when the data pipeline started."""
    with pytest.raises(ConfigError, match=r"data.seq_len=100 cannot hold .* data.max_caption_tokens=96 .*needs >= 164"):
        load_config(None, ["data.seq_len=100", "data.max_caption_tokens=96"])
    cfg = load_config(None, ["data.seq_len=164", "data.max_caption_tokens=96"])
    from transfusion_mot.data.pipeline import layout

    assert layout(cfg)[0] == 164


def test_latent_shape_is_derived_from_the_codec_and_resolution(tmp_path):
    trained = load_config(None, ["data.resolution=32"])  # our VAE: 3 blocks = 4x down, 4 channels
    assert (trained.model.latent_channels, trained.model.latent_size) == (4, 8)
    deeper = load_config(None, ["data.resolution=128", "codec.vae_channels=[32,64,64,64]", "codec.vae_latent_channels=8"])
    assert (deeper.model.latent_channels, deeper.model.latent_size) == (8, 16)
    taef2 = load_config(None, ["codec.kind=taef2", "data.resolution=64", "model.patch_size=1"])
    assert (taef2.model.latent_channels, taef2.model.latent_size) == (32, 8)
    vae = tmp_path / "pipe" / "vae"  # a local diffusers folder, the VAE in a subfolder
    vae.mkdir(parents=True)
    (vae / "config.json").write_text(json.dumps({"latent_channels": 16, "block_out_channels": [8, 8, 8, 8]}))
    local = load_config(None, ["codec.kind=diffusers", f"codec.path={vae.parent}", "codec.subfolder=vae",
                               "data.resolution=256", "data.seq_len=1200"])
    assert (local.model.latent_channels, local.model.latent_size) == (16, 32)
    # a named paper size's 8 x 32 x 32 is what a codec the config cannot read (a hub id) falls back to
    paper = load_config(None, ["model.size=163M", "codec.kind=diffusers", "codec.path=org/vae", "data.seq_len=4096"])
    assert (paper.model.latent_channels, paper.model.latent_size) == (8, 32)


@pytest.mark.parametrize("overrides,message", [
    (["data.resolution=30"], r"data.resolution=30 is not divisible by the codec's downsampling factor 4"),
    (["codec.kind=taef2", "data.resolution=36"], "data.resolution=36 is not divisible by the codec's downsampling factor 8"),
    (["model.latent_size=8"], r"model.latent_size=8 but data.resolution=64 / the codec's factor 4 = 16"),
    (["model.latent_channels=8"], "model.latent_channels=8 but the codec gives 4"),
    (["codec.kind=diffusers", "codec.path=org/vae"], r"model.latent_channels=0 \(from the codec\) but the config "
                                                     r"does not tell the codec's latent shape"),
])
def test_latent_shape_the_codec_contradicts_is_refused(overrides, message):
    """Before any work: a mismatch used to show only after the VAE was trained (90 s) or loaded."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_hub_codec_with_an_explicit_latent_shape_loads():
    cfg = load_config(None, ["codec.kind=diffusers", "codec.path=org/vae", "model.latent_channels=16",
                             "model.latent_size=8"])
    assert (cfg.model.latent_channels, cfg.model.latent_size) == (16, 8)
