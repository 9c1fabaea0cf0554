"""The discrete image tokenizer (Chameleon setting): ImageTokenizer over a diffusers VQModel, its trainer,
its cache, pretrained folders, and the config checks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import REPO

from transfusion_mot.config import CodecConfig, ConfigError, load_config
from transfusion_mot.data.codec import load_codec
from transfusion_mot.data.vq import ImageTokenizer, code_usage, load_image_tokenizer
from transfusion_mot.data.vq_train import image_tokenizer_for, train_vq, vq_key

# A tiny tokenizer: 16 px shapes, 2x downsampling (8x8 tokens), 64 codes, the default recipe (EMA codebook,
# restarts). Measured on 16 test images: 17.7 dB after 100 steps (an untrained one: ~12 dB).
TINY = dict(resolution=16, steps=100, channels=(16, 16), latent_channels=4, codebook_size=64, batch_size=8,
            train_crop=None, lr=5e-3)
TINY_OVERRIDES = ["data.resolution=16", "codec.kind=vq", "codec.vq_steps=3", "codec.vq_channels=[8, 8]",
                  "codec.vq_codebook_size=16", "data.shapes_train_size=64", "data.shapes_val_size=16"]


def shapes_pixels(split: str, n: int, resolution: int = 16, offset: int = 0) -> torch.Tensor:
    from transfusion_mot.data.shapes import ShapesDataset
    from transfusion_mot.data.sources import ImageTransform

    data, tf = ShapesDataset(split, size=1000, resolution=resolution), ImageTransform(resolution)
    return torch.stack([tf(data[offset + i].image) for i in range(n)])  # (n, 3, R, R)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return -10 * torch.log10((a - b).pow(2).flatten(1).mean(1))


@pytest.fixture(scope="module")
def pool() -> torch.Tensor:
    """128 training scenes at 16 px, rendered once: ``batches(pool)`` cycles through them."""
    return shapes_pixels("train", 128)


def batches(pool: torch.Tensor, size: int = 8):
    return lambda step: pool[(size * step) % len(pool):][:size]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, pool: torch.Tensor) -> Path:
    out = tmp_path_factory.mktemp("vq") / "tiny"
    return train_vq(batches(pool), out, eval_images=batches(shapes_pixels("val", 32)), **TINY)


@pytest.fixture(scope="module")
def tiny(tiny_folder: Path) -> ImageTokenizer:
    return ImageTokenizer.from_pretrained(tiny_folder)


def test_round_trip_of_a_trained_tokenizer(tiny: ImageTokenizer, tiny_folder: Path):
    x = shapes_pixels("test", 16)
    ids = tiny.encode(x)
    assert ids.shape == (16, 8, 8) and ids.dtype == torch.long
    assert (tiny.codebook_size, tiny.downsample, tiny.latent_size(16)) == (64, 2, 8)
    assert 0 <= ids.min() and ids.max() < 64
    y = tiny.decode(ids)
    assert y.shape == x.shape and y.dtype == torch.float32 and 0 <= y.min() and y.max() <= 1
    assert psnr(y, x).mean() >= 16.0  # close to x: an untrained tokenizer gives ~12 dB
    meta = json.loads((tiny_folder / "codec.json").read_text())
    assert meta["kind"] == "vq" and meta["codes_used"] >= 32 and meta["perplexity"] > 8  # codes are spread
    # The ids are the VQModel's own codes: its decode path (quantise, post_quant_conv, decoder) agrees.
    vq = tiny.backend.vq
    ref = ((vq.decode(vq.encode(x * 2 - 1).latents).sample + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=0)


def test_encoding_is_deterministic_and_batch_independent(tiny: ImageTokenizer):
    x = shapes_pixels("test", 10)
    ids = tiny.encode(x)
    assert torch.equal(tiny.encode(x), ids)
    tiny.batch_size = 3  # chunks of 3, 3, 3, 1
    try:
        assert torch.equal(tiny.encode(x), ids)
        assert torch.equal(tiny.encode(x[7:8]), ids[7:8])
        torch.testing.assert_close(tiny.decode(ids[:4]), tiny.decode(ids)[:4])
    finally:
        tiny.batch_size = 64


def test_bad_inputs_are_refused(tiny: ImageTokenizer):
    with pytest.raises(ValueError, match="multiple"):
        tiny.encode(torch.rand(1, 3, 15, 16))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        tiny.encode(torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        tiny.decode(torch.full((1, 8, 8), 64))
    with pytest.raises(ValueError, match="integer ids"):
        tiny.decode(torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="integer ids"):
        tiny.decode(torch.zeros(8, 8, dtype=torch.long))


def test_code_usage():
    ids = torch.tensor([[0, 0], [1, 1]])  # two codes, equally often
    assert code_usage(ids, 8) == {"perplexity": pytest.approx(2.0), "codes_used": 2, "code_usage": 0.25}
    assert code_usage(torch.zeros(5, dtype=torch.long), 4)["perplexity"] == pytest.approx(1.0)


def test_restarts_keep_codes_alive(tmp_path: Path, pool: torch.Tensor):
    """diffusers' codebook starts at uniform(+-1/K), away from the encoder's outputs, and codes that win
    nothing early never move again; starting from (and restarting dead codes on) encoder outputs uses
    them. Measured after 8 steps with 32 codes: 12 used without restarts, 32 with."""
    kw = dict(TINY, steps=8, codebook_size=32)
    images = batches(pool)
    used = {}
    for restart in (False, True):
        folder = train_vq(images, tmp_path / str(restart), restart_codes=restart, eval_images=images, **kw)
        meta = json.loads((folder / "codec.json").read_text())
        used[restart] = meta["codes_used"]
        assert meta["codes_restarted"] >= 32 if restart else meta["codes_restarted"] == 0
    assert used[True] >= 2 * used[False] and used[True] >= 24, used


# ---- the cache: trained once per (data, knobs), reused ------------------------------------------------------

def test_cache_trains_once_and_reuses(monkeypatch, tmp_path: Path):
    from transfusion_mot.data import vq_train

    cfg = load_config(None, [f"codec.cache_dir={tmp_path}", *TINY_OVERRIDES])
    first = image_tokenizer_for(cfg)
    folder = tmp_path / "vq" / vq_key(cfg, _records(cfg))
    assert (folder / "codec.json").is_file() and (folder / "config.json").is_file()
    assert json.loads((folder / "codec.json").read_text())["steps"] == 3

    def never(*args, **kwargs):
        raise AssertionError("a cached tokenizer must not be trained again")

    monkeypatch.setattr(vq_train, "train_vq", never)
    second = image_tokenizer_for(cfg)
    assert second.name == first.name and second.codebook_size == 16 and second.downsample == 2
    x = shapes_pixels("test", 2)
    assert torch.equal(second.encode(x), first.encode(x))
    assert sorted(p.name for p in (tmp_path / "vq").iterdir()) == [f".{folder.name}.lock", folder.name]
    with pytest.raises(AssertionError, match="trained again"):  # another knob, another key: trains
        image_tokenizer_for(load_config(None, [f"codec.cache_dir={tmp_path}", *TINY_OVERRIDES, "codec.vq_steps=4"]))


def _records(cfg):
    from transfusion_mot.data.pipeline import build_records

    return build_records(cfg.data)


def test_key_changes_with_every_knob():
    base = load_config(None, TINY_OVERRIDES)
    records = _records(base)
    key = vq_key(base, records)
    assert key.startswith("vq-")
    for same in ("codec.vae_steps=7", "model.dim=64", "codec.vae_chroma_weight=3"):
        assert vq_key(load_config(None, [*TINY_OVERRIDES, same]), records) == key, same
    for change in ("codec.vq_steps=4", "codec.vq_codebook_size=32", "codec.vq_latent_channels=3",
                   "codec.vq_channels=[8, 16]", "codec.vq_chroma_weight=2", "train.seed=1"):
        assert vq_key(load_config(None, [*TINY_OVERRIDES, change]), records) != key, change
    other = load_config(None, [*TINY_OVERRIDES, "data.shapes_train_size=65"])
    assert vq_key(other, _records(other)) != key  # other data


# ---- a pretrained VQModel from a local folder -------------------------------------------------------------

def pipeline_folder(root: Path, seed: int = 0) -> Path:
    """A pipeline-style folder: model_index.json and the VQModel in vq/ (as save_pretrained writes it)."""
    from diffusers import VQModel

    torch.manual_seed(seed)
    vq = VQModel(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                 block_out_channels=(8, 8, 8), norm_num_groups=4, latent_channels=3, num_vq_embeddings=40)
    vq.save_pretrained(root / "vq")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "SomePipeline", "vq": ["diffusers", "VQModel"]}))
    return root


def test_pretrained_folder_with_a_vq_subfolder_loads_offline(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = pipeline_folder(tmp_path / "pipe")
    cfg = load_config(None, ["codec.kind=vq", f"codec.path={root}", "codec.subfolder=vq"])
    tok = load_image_tokenizer(cfg.codec)
    assert image_tokenizer_for(cfg).name == tok.name  # with a path, nothing is trained
    assert (tok.codebook_size, tok.downsample) == (40, 4) and tok.name.startswith("vq-")
    x = torch.rand(2, 3, 32, 32)
    ids = tok.encode(x)
    assert ids.shape == (2, 8, 8) and ids.max() < 40
    vq = tok.backend.vq
    _, _, (_, _, ref) = vq.quantize(vq.encode(x * 2 - 1).latents)
    assert torch.equal(ids.reshape(-1), ref.reshape(-1))  # the VQModel's own nearest codes
    assert tok.decode(ids).shape == (2, 3, 32, 32)
    # The name follows the weights: the same folder names the same tokenizer, other weights another.
    assert load_image_tokenizer(cfg.codec).name == tok.name
    other = pipeline_folder(tmp_path / "other", seed=1)
    assert load_image_tokenizer(CodecConfig(kind="vq", path=str(other), subfolder="vq")).name != tok.name


def test_pretrained_folder_errors_name_the_file(tmp_path: Path):
    from diffusers import AutoencoderKL

    root = pipeline_folder(tmp_path / "pipe")
    with pytest.raises(FileNotFoundError, match=r"pipe/config\.json.*codec\.subfolder"):
        load_image_tokenizer(CodecConfig(kind="vq", path=str(root)))
    with pytest.raises(FileNotFoundError, match=r"vqvae/config\.json"):
        load_image_tokenizer(CodecConfig(kind="vq", path=str(root), subfolder="vqvae"))
    (root / "vq" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="could not load the VQModel"):
        load_image_tokenizer(CodecConfig(kind="vq", path=str(root), subfolder="vq"))
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=4).save_pretrained(tmp_path / "kl")
    with pytest.raises(ValueError, match="AutoencoderKL, not a VQModel"):
        load_image_tokenizer(CodecConfig(kind="vq", path=str(tmp_path / "kl")))
    with pytest.raises(ValueError, match="codec.kind=vq"):
        load_image_tokenizer(CodecConfig(kind="trained", path=str(root)))
    with pytest.raises(ValueError, match="without codec.path"):
        load_image_tokenizer(CodecConfig(kind="vq"))
    with pytest.raises(ValueError, match="discrete image tokens"):  # the latent codec refuses it clearly
        load_codec(CodecConfig(kind="vq", path=str(root)))


# ---- config -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, match", [
    ("codec.vq_codebook_size=1", "codec.vq_codebook_size=1"),
    ("codec.vq_steps=0", "codec.vq_steps=0"),
    ("codec.vq_latent_channels=0", "codec.vq_latent_channels=0"),
    ("codec.vq_channels=[]", "codec.vq_channels"),
    ("codec.vq_channels=[32, 0]", "codec.vq_channels"),
    ("codec.vq_chroma_weight=-1", "codec.vq_chroma_weight=-1"),
    ("codec.subfolder=vq", "codec.subfolder='vq'"),  # without codec.path
    ("codec.kind=vqgan", r"codec.kind='vqgan' is not one of .*'vq'"),
])
def test_validate_refuses_bad_vq_values(override: str, match: str):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["codec.kind=vq", override])


def test_validate_checks_resolution_against_the_tokenizer():
    with pytest.raises(ConfigError, match=r"data.resolution=60.*downsampling 8"):
        load_config(None, ["codec.kind=vq", "data.resolution=60", "codec.vq_channels=[8, 8, 8, 8]"])
    with pytest.raises(ConfigError, match="codec.subfolder='../x'"):
        load_config(None, ["codec.kind=vq", "codec.path=/p", "codec.subfolder=../x"])
    load_config(None, ["codec.kind=vq", "data.resolution=60", "codec.path=/some/vq",  # its own downsampling,
                       "model.latent_channels=8", "model.latent_size=16"])  # which a missing folder cannot tell
    cfg = load_config(str(REPO / "configs" / "main.yaml"), ["codec.kind=vq"])  # the defaults fit the main job
    assert cfg.data.resolution % 2 ** (len(cfg.codec.vq_channels) - 1) == 0


def test_codebook_keeper_ema_and_restarts():
    """EMA: a code's vector moves to the running mean of the encoder outputs it wins, codes that win
    nothing stay put (until restarted); restarts: dead codes land on (jittered) encoder outputs."""
    from transfusion_mot.data.vq_train import CodebookKeeper

    codebook = torch.tensor([[0.0, 0.0], [5.0, -5.0], [9.0, 9.0]])  # (K=3, D=2)
    keeper = CodebookKeeper(codebook, restart=False, ema=0.9, gen=torch.Generator().manual_seed(0))
    z, ids = torch.tensor([[1.0, 2.0], [3.0, 2.0]]), torch.tensor([0, 0])  # both won by code 0: mean (2, 2)
    for step in range(10):
        keeper.update(z, ids, step, 100)
    assert 1.0 < codebook[0, 0] < 2.0 and codebook[0, 0] == codebook[0, 1]  # on its way
    torch.testing.assert_close(codebook[1:], torch.tensor([[5.0, -5.0], [9.0, 9.0]]), atol=1e-3, rtol=0)
    for step in range(10, 100):
        keeper.update(z, ids, step, 100)
    torch.testing.assert_close(codebook[0], torch.tensor([2.0, 2.0]), atol=1e-3, rtol=0)
    keeper.restart_codes(torch.tensor([False, True, True]), z)
    assert keeper.restarted == 2
    assert all(min((codebook[k] - zi).abs().max() for zi in z) < 0.1 for k in (1, 2))
    torch.testing.assert_close(codebook[0], torch.tensor([2.0, 2.0]), atol=1e-3, rtol=0)
