"""Bad configs stop with an error naming the key (one test per kind), and the override order."""
import pytest

from transfusion_mot.config import ConfigError, load_config


def test_defaults_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  size: small\n  n_layers: 3\noptim:\n  lr: 1.0e-3\n")
    cfg = load_config(f, ["model.n_layers=5", "train.compile=true", "optim.betas=[0.9, 0.99]"])
    assert cfg.model.dim == 256  # from the named size
    assert cfg.model.n_layers == 5  # CLI beats YAML beats size
    assert cfg.optim.lr == 1e-3 and cfg.train.compile is True and cfg.optim.betas == (0.9, 0.99)


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'model.n_layer'; did you mean model.n_layers\?"):
        load_config(None, ["model.n_layer=3"])
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        load_config(None, ["trian.steps=3"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"model.dim: expected int, got str 'big'"):
        load_config(None, ["model.dim=big"])
    with pytest.raises(ConfigError, match=r"train.compile: expected bool"):
        load_config(None, ["train.compile=3"])


def test_dim_not_divisible_by_heads():
    with pytest.raises(ConfigError, match=r"model.dim=100 is not divisible by model.n_heads=3"):
        load_config(None, ["model.dim=100", "model.n_heads=3"])


def test_patch_size_must_divide_latent_size():
    with pytest.raises(ConfigError, match=r"model.patch_size=4 does not divide model.latent_size=6"):
        load_config(None, ["model.latent_size=6", "model.patch_size=4"])


def test_negative_lambda():
    with pytest.raises(ConfigError, match=r"flow.loss_weight=-1.0 must be >= 0"):
        load_config(None, ["flow.loss_weight=-1"])


@pytest.mark.parametrize("key", ["codec.vae_latent_noise", "codec.vae_chroma_weight"])
def test_negative_vae_loss_knobs(key):
    with pytest.raises(ConfigError, match=rf"{key}=-0.5 must be >= 0"):
        load_config(None, [f"{key}=-0.5"])


def test_bad_choice_and_size_and_seq_len():
    with pytest.raises(ConfigError, match=r"model.arch='mots' .*did you mean 'mot'"):
        load_config(None, ["model.arch=mots"])
    with pytest.raises(ConfigError, match=r"model.size='smal' .*did you mean 'small'"):
        load_config(None, ["model.size=smal"])
    with pytest.raises(ConfigError, match=r"data.seq_len=32 cannot hold one image of 64 patches"):
        load_config(None, ["data.seq_len=32"])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["model.dim"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_every_shipped_config_loads():
    from pathlib import Path

    for f in sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")):
        load_config(f)
