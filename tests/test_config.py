"""Bad configs stop with an error naming the key (one test per kind), and the override order."""
from pathlib import Path

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


def test_vae_lr_must_be_positive():
    with pytest.raises(ConfigError, match=r"codec.vae_lr=0.0 must be > 0"):
        load_config(None, ["codec.vae_lr=0"])


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


def test_backbone_shorthand_and_nested_form_give_equal_configs(tmp_path):
    """``model.dim`` (flat, the shorthand) and ``model.backbone.dim`` fill the one nested BackboneConfig, in
    YAML and on the command line, under a named size's defaults."""
    flat, nested = tmp_path / "flat.yaml", tmp_path / "nested.yaml"
    flat.write_text("model:\n  size: debug\n  arch: moe\n  n_layers: 3\n  norm_placement: pre\n  moe_experts: 2\n")
    nested.write_text("model:\n  size: debug\n  arch: moe\n  backbone:\n    n_layers: 3\n    norm_placement: pre\n"
                      "    moe_experts: 2\n")
    a, b = load_config(flat, ["model.qk_norm=true"]), load_config(nested, ["model.backbone.qk_norm=true"])
    assert a == b and a.model.backbone.n_layers == 3 and a.model.backbone.qk_norm is True
    assert a.model.backbone.dim == 64 and a.model.dim == 64  # the size's default; the flat name reads it
    assert "dim" not in a.to_dict()["model"] and a.to_dict()["model"]["backbone"]["n_layers"] == 3
    assert load_config(nested, ["model.n_layers=5"]).model.backbone.n_layers == 5  # CLI beats YAML either way
    assert load_config(flat, ["model.backbone.n_layers=5"]).model.backbone.n_layers == 5


def test_backbone_key_given_both_ways_must_agree(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  dim: 64\n  backbone:\n    dim: 128\n")
    with pytest.raises(ConfigError, match=r"model.dim=64 and model.backbone.dim=128 disagree in .*c.yaml"):
        load_config(f)
    with pytest.raises(ConfigError, match=r"model.n_heads=2 and model.backbone.n_heads=4 disagree in the overrides"):
        load_config(None, ["model.n_heads=2", "model.backbone.n_heads=4"])
    f.write_text("model:\n  dim: 64\n  backbone:\n    dim: 64\n")
    assert load_config(f).model.backbone.dim == 64  # the same value twice is fine
    with pytest.raises(ConfigError, match="unknown config key 'model.backbone.n_layer'; did you mean"):
        load_config(None, ["model.backbone.n_layer=3"])


def test_groups_and_experts_follow_from_arch_and_modalities():
    """One place decides the backbone's layout: no group count a user sets that could disagree."""
    from transfusion_mot.config import Config

    m = Config().model
    assert (m.n_modalities, m.n_groups, m.moe) == (2, 2, False)
    m.extra_modalities = ("frames",)
    assert (m.n_modalities, m.n_groups) == (3, 3)
    m.arch = "dense"
    assert (m.n_groups, m.moe) == (1, False)
    m.arch = "moe"
    assert (m.n_groups, m.moe) == (1, True)
    with pytest.raises(ConfigError, match=r"model.n_modalities=3 but .* make 2"):
        load_config(None, ["model.n_modalities=3"])  # older configs' key: accepted only where it agrees
    assert load_config(None, ["model.n_modalities=2"]).model.n_groups == 2


def test_a_saved_config_of_the_flat_layout_loads(tmp_path):
    """Run dirs and exported folders written before the nesting (flat backbone keys, model.n_modalities)."""
    from transfusion_mot.config import config_from_dict

    cfg = load_config(Path(__file__).parents[1] / "configs" / "debug.yaml", ["model.n_layers=3", "model.norm_placement=pre"])
    old = cfg.to_dict()
    old["model"] = {**{k: v for k, v in old["model"].items() if k != "backbone"}, **old["model"]["backbone"],
                    "n_modalities": 2}
    assert config_from_dict(old) == cfg == config_from_dict(cfg.to_dict())
