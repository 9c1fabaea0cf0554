"""LatentCodec over TAEF2 / diffusers / our trained VAE, the VAE trainer, and the latent cache."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image as PILImage

from conftest import REPO

from transfusion_mot.config import CodecConfig, load_config
from transfusion_mot.data import taef2
from transfusion_mot.metrics import shapes_checker
from transfusion_mot.data.codec import LatentCodec, load_codec
from transfusion_mot.data.latent_cache import CACHE_ENV, CachedEncoder, LatentCache, resolve_cache_dir
from transfusion_mot.data.vae_train import cached_vae_dir, get_or_train_vae, train_vae


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (N, 3, H, W) images in [0, 1]."""
    return -10 * torch.log10((a - b).pow(2).flatten(1).mean(1))


# ---- TAEF2 ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def taef2_codec(assets_dir: Path) -> LatentCodec:
    vae = assets_dir / "vae"
    return LatentCodec.from_taef2(vae / "taef2_encoder.pth", vae / "taef2_decoder.pth")


def flickr_pixels(assets_dir: Path, names: list[str] | None = None, n: int = 16, size: int = 128) -> torch.Tensor:
    """Flickr8k images as the MANIFEST measured them: centre square crop, bicubic resize, [0, 1]."""
    import numpy as np
    from PIL import Image as PILImage

    folder = assets_dir / "images" / "flickr8k-1000"
    files = [folder / f"{name}.jpg" for name in names] if names else sorted(folder.glob("*.jpg"))[:n]
    out = []
    for f in files:
        im = PILImage.open(f).convert("RGB")
        w, h = im.size
        s = min(w, h)
        box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
        im = im.crop(box).resize((size, size), PILImage.Resampling.BICUBIC)
        out.append(torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255)
    return torch.stack(out)  # (N, 3, size, size)


def test_taef2_weights_load_strictly(assets_dir: Path):
    # load_state_dict(strict=True) inside: every key and shape of the upstream files has a place here.
    enc = taef2.load_encoder(assets_dir / "vae" / "taef2_encoder.pth")
    dec = taef2.load_decoder(assets_dir / "vae" / "taef2_decoder.pth")
    assert sum(p.numel() for p in enc.parameters()) == 1_338_528
    assert sum(p.numel() for p in dec.parameters()) == 1_338_499
    assert all(p.dtype == torch.float32 for p in [*enc.parameters(), *dec.parameters()])
    with pytest.raises(RuntimeError, match="Unexpected key"):
        taef2.build_encoder().load_state_dict(torch.load(assets_dir / "vae" / "taef2_decoder.pth"), strict=True)


def test_taef2_matches_manifest_reference(taef2_codec: LatentCodec, assets_dir: Path):
    """Per-image PSNR equal to the MANIFEST's verified reimplementation: the network is faithful."""
    x = flickr_pixels(assets_dir, ["1000268201_693b08cb0e", "1001773457_577c3a7d70"])
    got = psnr(taef2_codec.decode(taef2_codec.encode(x)), x)
    assert torch.allclose(got, torch.tensor([24.91, 28.91]), atol=0.05), got


def test_taef2_flickr_round_trip(taef2_codec: LatentCodec, assets_dir: Path):
    from transfusion_mot.data.sources import ImageTransform

    files = sorted((assets_dir / "images" / "flickr8k-1000").glob("*.jpg"))[:16]  # the first 16, as training reads them
    tf = ImageTransform(128)
    x = torch.stack([tf(PILImage.open(f)) for f in files])
    z = taef2_codec.encode(x)
    assert z.shape == (16, 32, 16, 16) and taef2_codec.latent_size(128) == 16
    assert 0.6 < z.std() < 1.2  # raw latents are roughly unit scale (MANIFEST: std ~0.9)
    y = taef2_codec.decode(z)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    mean_psnr = psnr(y, x).mean().item()
    print(f"TAEF2 mean PSNR on 16 Flickr8k images at 128 px: {mean_psnr:.2f} dB")
    # Through the data pipeline's transform (bilinear, as torchvision/diffusers resize): ~28.1 dB. A bicubic
    # resize sharpens and gives 26.7 dB on these 16; the network itself is pinned to the MANIFEST's per-image
    # values by test_taef2_matches_manifest_reference.
    assert mean_psnr >= 27.0


def test_taef2_bad_resolution(taef2_codec: LatentCodec):
    with pytest.raises(ValueError, match="multiple"):
        taef2_codec.encode(torch.rand(1, 3, 60, 60))


# ---- our trained VAE -----------------------------------------------------------------------------------

# Colour facts of the caption found in the main-job VAE's reconstructions: 0.425 measured at the suite's 100
# steps (and at 150); the main job's 600 steps give 1.00 (its report's ceiling, 0.913, is over every fact).
COLOUR_FACTS_MIN = 0.35


def shapes_images(split: str, resolution: int, batch_size: int = 16, **knobs):
    """``images(step)`` over a shapes split, as the VAE trainer wants it (``knobs``: ShapesDataset's)."""
    from transfusion_mot.data.shapes import ShapesDataset
    from transfusion_mot.data.sources import ImageTransform

    data = ShapesDataset(split, size=50_000, resolution=resolution, **knobs)
    tf = ImageTransform(resolution)

    def images(step: int) -> torch.Tensor:
        return torch.stack([tf(data[(step * batch_size + i) % len(data)].image) for i in range(batch_size)])

    return images


@pytest.fixture(scope="session")
def shapes_vae(main_vae: Path) -> Path:
    """The main job's VAE settings (configs/main.yaml, fewer steps), trained once per session (conftest.main_vae)."""
    return main_vae


def test_trained_vae_reconstructs_shapes(shapes_vae: Path):
    meta = json.loads((shapes_vae / "codec.json").read_text())
    print(f"shapes VAE: {meta['seconds']:.1f} s for {meta['steps']} steps, held-out PSNR {meta['psnr']:.2f} dB")
    codec = load_codec(CodecConfig(kind="trained", path=str(shapes_vae)))
    assert (codec.latent_channels, codec.downsample) == (4, 4)
    assert codec.scaling_factor == pytest.approx(meta["scaling_factor"])
    main = load_config(str(REPO / "configs" / "main.yaml")).data  # the data the main job's VAE is trained on
    x = shapes_images("test", 64, batch_size=32, max_shapes=main.shapes_max_shapes, textured=main.shapes_textured)(0)
    z = codec.encode(x)
    assert z.shape == (32, 4, 16, 16)
    assert 0.7 < z.std() < 1.4 and abs(z.mean()) < 0.3  # scale/shift make latents ~unit variance
    recon = codec.decode(z)
    mean_psnr = psnr(recon, x).mean().item()
    print(f"shapes VAE PSNR on 32 test images at 64 px: {mean_psnr:.2f} dB")
    # Measured at 100 steps: 20.31 dB (150: 21.29; the main job's 600: 26.0 held-out; the chroma weight trades
    # background PSNR for the shapes' colours).
    assert mean_psnr >= 19.5
    # What the main job is scored on: the checker finds each caption's colours in the reconstruction.
    captions = shapes_checker.held_out_prompts(32, split="test", max_shapes=main.shapes_max_shapes)  # the images' captions
    colour = [v for img, c in zip(recon, captions) for k, v in shapes_checker.check(img, c).facts.items()
              if k.endswith("colour")]
    print(f"colour facts found in the reconstructions: {sum(colour) / len(colour):.3f}")
    assert sum(colour) / len(colour) >= COLOUR_FACTS_MIN


def test_get_or_train_vae_reuses_a_complete_folder(shapes_vae: Path):
    def never(step: int) -> torch.Tensor:
        raise AssertionError("a cached VAE must not be trained again")

    again = get_or_train_vae(shapes_vae.name, never, shapes_vae.parent.parent, resolution=64, steps=150)
    assert again == shapes_vae


def test_train_vae_writes_atomically_and_replaces(tmp_path: Path):
    images = shapes_images("train", 16, batch_size=2)
    kw = dict(resolution=16, steps=2, channels=(8, 8), latent_channels=2, batch_size=2, train_crop=None,
              latent_noise=0.2, chroma_weight=5.0)
    out = tmp_path / "vae"
    out.mkdir()
    (out / "half-written.bin").write_bytes(b"x")  # a killed earlier run
    assert train_vae(images, out, **kw) == out
    meta = json.loads((out / "codec.json").read_text())
    for key in ("scaling_factor", "shift_factor", "psnr", "steps", "resolution", "name", "seconds"):
        assert key in meta
    assert meta["scaling_factor"] > 0 and meta["steps"] == 2 and meta["latent_noise"] == 0.2
    assert meta["chroma_weight"] == 5.0
    assert not (out / "half-written.bin").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]  # no temp folders left behind
    codec = LatentCodec.from_trained(out)
    assert codec.encode(images(0)).shape == (2, 2, 8, 8)


def test_cache_dir_env_override(monkeypatch, tmp_path: Path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert resolve_cache_dir() == tmp_path
    assert resolve_cache_dir(CodecConfig().cache_dir) == tmp_path
    assert resolve_cache_dir("/elsewhere") == Path("/elsewhere")  # an explicit dir wins over the env var
    assert cached_vae_dir(CodecConfig().cache_dir, "k") == tmp_path / "vae" / "k"
    with pytest.raises(ValueError, match="key"):
        cached_vae_dir(tmp_path, "../escape")


# ---- diffusers -------------------------------------------------------------------------------------------

def tiny_autoencoder(folder: Path, scaling_factor: float = 0.5, shift_factor: float | None = 0.1) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 8), latent_channels=3, norm_num_groups=4,
                        scaling_factor=scaling_factor, shift_factor=shift_factor)
    vae.save_pretrained(folder)
    return folder


def test_from_diffusers_uses_config_factors(tmp_path: Path):
    folder = tiny_autoencoder(tmp_path / "vae")
    codec = LatentCodec.from_diffusers(folder)
    assert (codec.scaling_factor, codec.shift_factor) == (0.5, 0.1)
    assert (codec.latent_channels, codec.downsample, codec.latent_size(16)) == (3, 2, 8)
    x = torch.rand(3, 3, 16, 16)
    z = codec.encode(x)
    raw = codec.backend.vae.encode(x * 2 - 1).latent_dist.mean
    torch.testing.assert_close(z, (raw - 0.1) * 0.5)  # posterior mean, normalised
    torch.testing.assert_close(codec.encode(x), z)  # deterministic
    y = codec.decode(z)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    expected = ((codec.backend.vae.decode(raw).sample + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(y, expected)
    # Explicit factors win over the config; they change the cache name.
    other = LatentCodec.from_diffusers(folder, scaling_factor=2.0, shift_factor=0.0)
    assert (other.scaling_factor, other.shift_factor) == (2.0, 0.0) and other.name != codec.name
    via_cfg = load_codec(CodecConfig(kind="diffusers", path=str(folder)))
    assert via_cfg.name == codec.name and via_cfg.name.startswith("vae-")


def test_from_diffusers_without_shift_in_config(tmp_path: Path):
    codec = LatentCodec.from_diffusers(tiny_autoencoder(tmp_path / "vae", 0.25, None))
    assert (codec.scaling_factor, codec.shift_factor) == (0.25, 0.0)


def test_pretrained_vae_in_a_pipeline_folder(tmp_path: Path):
    """A diffusers pipeline folder (model_index.json + vae/), as users name hub VAEs: path + subfolder."""
    pipe = tmp_path / "tiny-pipeline"
    tiny_autoencoder(pipe / "vae", scaling_factor=1.5305, shift_factor=0.0609)  # SD-3's factors
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline",
                                                       "vae": ["diffusers", "AutoencoderKL"]}))
    codec = load_codec(CodecConfig(kind="diffusers", path=str(pipe), subfolder="vae"))
    assert (codec.scaling_factor, codec.shift_factor) == (1.5305, 0.0609)
    assert (codec.latent_channels, codec.downsample) == (3, 2) and codec.encode(torch.rand(2, 3, 16, 16)).shape == (2, 3, 8, 8)
    assert codec.name == LatentCodec.from_diffusers(pipe / "vae").name  # same weights, same latents, same name
    with pytest.raises(FileNotFoundError, match="set codec.subfolder=vae"):
        load_codec(CodecConfig(kind="diffusers", path=str(pipe)))
    with pytest.raises(FileNotFoundError, match=r"tiny-pipeline/unet/config\.json"):
        load_codec(CodecConfig(kind="diffusers", path=str(pipe), subfolder="unet"))
    # a hub id that is not available offline names the id and the subfolder
    with pytest.raises(FileNotFoundError, match=r"'stabilityai/stable-diffusion-3-medium-diffusers' \(subfolder 'vae'\)"):
        load_codec(CodecConfig(kind="diffusers", path="stabilityai/stable-diffusion-3-medium-diffusers", subfolder="vae"))


# ---- missing files and bad config -----------------------------------------------------------------------

def test_missing_files_are_named(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"taef2_encoder\.pth.*madebyollin/taesd"):
        load_codec(CodecConfig(kind="taef2", encoder_path=str(tmp_path / "enc.pth"),
                               decoder_path=str(tmp_path / "dec.pth")))
    with pytest.raises(FileNotFoundError, match=r"taef2_encoder\.pth.*codec\.encoder_path"):
        load_codec(CodecConfig(kind="taef2"))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "taefolder" / "taef2_encoder.pth"))):
        load_codec(CodecConfig(kind="taef2", path=str(tmp_path / "taefolder")))
    with pytest.raises(FileNotFoundError, match=r"codec\.json.*train-vae"):
        load_codec(CodecConfig(kind="trained", path=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_codec(CodecConfig(kind="diffusers", path=str(tmp_path / "no-vae")))
    with pytest.raises(ValueError, match="codec.kind"):
        load_codec(CodecConfig(kind="vqgan"))
    with pytest.raises(ValueError, match="codec.path"):
        load_codec(CodecConfig(kind="trained"))


def test_corrupt_codec_json_field(tmp_path: Path):
    folder = tiny_autoencoder(tmp_path / "vae")
    (folder / "codec.json").write_text(json.dumps({"scaling_factor": "big", "shift_factor": 0.0}))
    with pytest.raises(ValueError, match="scaling_factor"):
        LatentCodec.from_trained(folder)


# ---- latent cache ---------------------------------------------------------------------------------------

class CountingCodec(torch.nn.Module):
    """A stand-in codec that records how many images it encoded."""

    def __init__(self):
        super().__init__()
        self.calls, self.images = 0, 0

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.images += len(pixels)
        return pixels[:, :2, ::4, ::4] * 3 - 1  # (N, 2, H/4, W/4)


def test_latent_cache_round_trip(tmp_path: Path):
    cache = LatentCache(tmp_path, "shapes", "vae-abc", 64)
    lat = torch.randn(3, 4, 16, 16)
    assert cache.get(["a", "b"]) == [None, None]
    cache.put(["a", "b/with/slashes", "c"], lat)
    got = cache.get(["c", "missing", "a", "b/with/slashes"])
    assert got[1] is None
    torch.testing.assert_close(torch.stack([got[2], got[3], got[0]]), lat)
    assert not list(cache.dir.rglob("*.tmp"))
    # Another codec, data set or resolution never sees these latents.
    for other in (LatentCache(tmp_path, "shapes", "taef2", 64), LatentCache(tmp_path, "coco", "vae-abc", 64),
                  LatentCache(tmp_path, "shapes", "vae-abc", 128)):
        assert other.dir != cache.dir and other.get(["a"]) == [None]
    assert LatentCache(tmp_path, "shapes", "vae-abc", 64).get(["a"])[0] is not None  # same triple, same dir
    with pytest.raises(ValueError, match="2 keys but 3"):
        cache.put(["x", "y"], lat)


def test_latent_cache_ignores_a_corrupt_file(tmp_path: Path):
    cache = LatentCache(tmp_path, "d", "c", 8)
    cache.put(["k"], torch.ones(1, 2, 2, 2))
    cache._path("k").write_bytes(b"truncated")
    assert cache.get(["k"]) == [None]


def test_cached_encoder_runs_codec_only_on_misses(tmp_path: Path):
    codec = CountingCodec()
    enc = CachedEncoder(codec, LatentCache(tmp_path, "d", "counting", 16))
    keys, x = [f"k{i}" for i in range(6)], torch.rand(6, 3, 16, 16)
    first = enc(keys[:4], x[:4])
    assert (codec.calls, codec.images, enc.misses, enc.hits) == (1, 4, 4, 0)
    second = enc(keys, x)  # 4 hits, 2 misses: only the 2 new images are encoded
    assert (codec.calls, codec.images, enc.misses, enc.hits) == (2, 6, 6, 4)
    torch.testing.assert_close(second[:4], first)
    third = enc(keys, x)
    assert (codec.calls, enc.hits) == (2, 10)  # second epoch: no encoder call at all
    torch.testing.assert_close(third, codec.encode(x))
    no_cache = CachedEncoder(CountingCodec())
    no_cache(keys, x)
    no_cache(keys, x)
    assert no_cache.codec.calls == 2 and no_cache.misses == 12


def test_vae_key_names_what_the_vae_was_trained_with():
    from transfusion_mot.data.pipeline import build_records, vae_key

    cfg = load_config(str(REPO / "configs" / "debug.yaml"))
    records = build_records(cfg.data)
    key = vae_key(cfg, records)
    assert key == vae_key(load_config(str(REPO / "configs" / "debug.yaml"), ["codec.vae_latent_noise=0"]), records)
    assert key == vae_key(load_config(str(REPO / "configs" / "debug.yaml"), ["codec.vae_chroma_weight=0"]), records)
    assert key == vae_key(load_config(str(REPO / "configs" / "debug.yaml"), ["codec.vae_lr=2e-3"]), records)
    for change in ("codec.vae_latent_noise=0.2", "codec.vae_chroma_weight=10", "codec.vae_steps=7", "train.seed=1",
                   "codec.vae_lr=1e-3"):
        assert vae_key(load_config(str(REPO / "configs" / "debug.yaml"), [change]), records) != key, change
