"""``LatentCodec``: one pixels <-> latents interface over every autoencoder the project can use.

Pixels are always (N, 3, H, W) in [0, 1]; latents are always normalised, ``(z - shift) * scale``,
so the flow sees roughly unit-variance inputs whichever autoencoder produced them. Backends:
a diffusers ``AutoencoderKL`` (hub id or folder, including the small one ``vae_train`` writes) and
TAEF2 (our own ``taef2.py`` loading the upstream ``.pth`` files). ``PixelCodec`` holds what it shares
with the discrete image tokenizer (vq.py): the size check, the device and the batching.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from ..config import CodecConfig

CODEC_JSON = "codec.json"  # written by vae_train beside the AutoencoderKL weights


class _KLBackend(nn.Module):
    """AutoencoderKL, which works on [-1, 1] images; encoding takes the posterior mode (deterministic)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) in [0, 1] -> (N, C, h, w)
        return self.vae.encode(pixels * 2 - 1).latent_dist.mode()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return (self.vae.decode(z).sample + 1) / 2


class _TinyBackend(nn.Module):
    """A tiny autoencoder (TAEF2) that works on [0, 1] images and raw latents directly."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixels)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)


class PixelCodec(nn.Module):
    """What every image codec shares: a frozen ``backend`` that sees [0, 1] pixels ``downsample`` times
    smaller, run gradient-free in chunks of ``batch_size`` on the backend's device. ``name`` identifies
    the weights (and anything else that changes the codes), so caches keyed by it never mix codecs."""

    def __init__(self, backend: nn.Module, downsample: int, name: str, batch_size: int = 64):
        super().__init__()
        self.backend = backend.eval().requires_grad_(False)
        self.downsample, self.name, self.batch_size = int(downsample), name, batch_size

    def _param(self) -> torch.Tensor:
        return next(self.backend.parameters())

    def latent_size(self, resolution: int) -> int:
        if resolution % self.downsample:
            raise ValueError(f"resolution {resolution} is not a multiple of codec {self.name!r}'s "
                             f"downsampling factor {self.downsample}")
        return resolution // self.downsample

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"encode expects pixels of shape (N, 3, H, W), got {tuple(pixels.shape)}")
        self.latent_size(pixels.shape[-1]), self.latent_size(pixels.shape[-2])

    def _batched(self, fn, x: torch.Tensor) -> torch.Tensor:
        """``fn`` over chunks of ``x`` (moved to the backend's device), concatenated."""
        device = self._param().device
        return torch.cat([fn(chunk.to(device)) for chunk in x.split(self.batch_size)])


class LatentCodec(PixelCodec):
    """Normalised latents in, [0, 1] pixels out, batched and gradient-free.

    ``name`` identifies the weights and the normalisation, so latent caches keyed by it never mix
    latents from two different codecs.
    """

    def __init__(self, backend: nn.Module, latent_channels: int, downsample: int, scaling_factor: float,
                 shift_factor: float, name: str, batch_size: int = 64):
        super().__init__(backend, downsample, name, batch_size)
        self.latent_channels = int(latent_channels)
        self.scaling_factor, self.shift_factor = float(scaling_factor), float(shift_factor)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, C, H/d, W/d) normalised float32 latents on the codec's device."""
        self._check_pixels(pixels)
        dtype = self._param().dtype
        out = self._batched(lambda chunk: self.backend.encode(chunk.to(dtype)).float(), pixels)
        return (out - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) normalised latents -> (N, 3, h d, w d) float32 pixels clamped to [0, 1]."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"decode expects latents of shape (N, {self.latent_channels}, h, w), "
                             f"got {tuple(latents.shape)}")
        dtype = self._param().dtype
        out = self._batched(lambda chunk: self.backend.decode(
            (chunk.float() / self.scaling_factor + self.shift_factor).to(dtype)).float(), latents)
        return out.clamp_(0, 1)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, latent_channels={self.latent_channels}, downsample={self.downsample}, "
                f"scaling_factor={self.scaling_factor:.5g}, shift_factor={self.shift_factor:.5g}")

    # ---- constructors -------------------------------------------------------------------------------

    @classmethod
    def from_diffusers(cls, path_or_hub_id: str | Path, scaling_factor: float | None = None,
                       shift_factor: float | None = None, subfolder: str = "") -> LatentCodec:
        """An ``AutoencoderKL`` from a folder or hub id, optionally in its ``subfolder`` (a pipeline's "vae",
        e.g. ``stabilityai/stable-diffusion-3-medium-diffusers`` + ``vae``); scale/shift from its config
        unless given (SD-1: 0.18215 / none; SD-3: 1.5305 / 0.0609; FLUX: 0.3611 / 0.1159)."""
        from diffusers import AutoencoderKL

        source = _resolve_diffusers_source(path_or_hub_id, subfolder)
        where = f"{source!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")
        try:
            vae = AutoencoderKL.from_pretrained(source, subfolder=subfolder or None).float()
        except OSError as err:  # a hub id that is not cached while offline, or a folder without weights
            raise FileNotFoundError(f"could not load AutoencoderKL {where}: neither a complete local folder "
                                    f"nor a hub id available here ({err})") from err
        scale = vae.config.scaling_factor if scaling_factor is None else scaling_factor
        shift = (vae.config.shift_factor or 0.0) if shift_factor is None else shift_factor
        local = Path(source).is_dir()  # weight bytes of a folder, else the hub id (+ subfolder)
        ident = _weights_identity(str(Path(source) / subfolder)) if local else f"{source}/{subfolder}".rstrip("/")
        name = "vae-" + _digest(ident, scale, shift)
        return cls(_KLBackend(vae), vae.config.latent_channels, 2 ** (len(vae.config.block_out_channels) - 1),
                   scale, shift, name)

    @classmethod
    def from_trained(cls, folder: str | Path, scaling_factor: float | None = None,
                     shift_factor: float | None = None) -> LatentCodec:
        """A folder written by ``vae_train``: AutoencoderKL weights + codec.json with the measured scale/shift."""
        folder = Path(folder).expanduser()
        meta_path = folder / CODEC_JSON
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"trained VAE metadata not found: {meta_path} (the codec.json that `transfusion-mot train-vae` "
                f"writes with the latent scale/shift). Train one with `transfusion-mot train-vae`, or leave "
                f"codec.path empty so the training job trains and caches one")
        meta = json.loads(meta_path.read_text())
        for key in ("scaling_factor", "shift_factor"):
            if not isinstance(meta.get(key), (int, float)):
                raise ValueError(f"{meta_path}: field {key!r} must be a number, got {meta.get(key)!r}")
        return cls.from_diffusers(folder,
                                  meta["scaling_factor"] if scaling_factor is None else scaling_factor,
                                  meta["shift_factor"] if shift_factor is None else shift_factor)

    @classmethod
    def from_taef2(cls, encoder_path: str | Path, decoder_path: str | Path, scaling_factor: float = 1.0,
                   shift_factor: float = 0.0) -> LatentCodec:
        """TAEF2 from the upstream .pth files; its latents are used raw unless a scale/shift is given."""
        from . import taef2

        backend = _TinyBackend(taef2.load_encoder(encoder_path), taef2.load_decoder(decoder_path))
        name = "taef2" if (scaling_factor, shift_factor) == (1.0, 0.0) else \
            "taef2-" + _digest(scaling_factor, shift_factor)
        return cls(backend, taef2.LATENT_CHANNELS, taef2.DOWNSAMPLE, scaling_factor, shift_factor, name)


def load_codec(cfg: CodecConfig) -> LatentCodec:
    """The codec a config names. ``kind="trained"`` needs ``path``; training one is the pipeline's job."""
    scale, shift = cfg.scaling_factor, cfg.shift_factor
    if cfg.kind == "diffusers":
        if not cfg.path:
            raise ValueError("codec.kind=diffusers needs codec.path=<AutoencoderKL folder or hub id> "
                             "(and codec.subfolder=vae for a pipeline folder)")
        return LatentCodec.from_diffusers(cfg.path, scale, shift, subfolder=cfg.subfolder)
    if cfg.kind == "trained":
        if not cfg.path:
            raise ValueError("codec.kind=trained needs codec.path=<folder written by `transfusion-mot train-vae`>")
        return LatentCodec.from_trained(cfg.path, scale, shift)
    if cfg.kind == "taef2":
        folder = Path(cfg.path).expanduser() if cfg.path else None
        enc = cfg.encoder_path or (folder / "taef2_encoder.pth" if folder else "")
        dec = cfg.decoder_path or (folder / "taef2_decoder.pth" if folder else "")
        if not enc or not dec:
            missing = "taef2_encoder.pth" if not enc else "taef2_decoder.pth"
            raise FileNotFoundError(
                f"TAEF2 weights not given: {missing} (the tiny FLUX.2 autoencoder from github.com/madebyollin/taesd). "
                f"Pass codec.encoder_path= and codec.decoder_path=, or codec.path=<folder holding both .pth files>")
        return LatentCodec.from_taef2(enc, dec, 1.0 if scale is None else scale, 0.0 if shift is None else shift)
    if cfg.kind == "vq":
        raise ValueError("codec.kind=vq gives discrete image tokens (data/vq.py ImageTokenizer, the Chameleon "
                         "setting), not the latents this model trains on; use codec.kind=trained, diffusers or taef2")
    raise ValueError(f"codec.kind must be 'trained', 'diffusers' or 'taef2', got {cfg.kind!r}")


def _resolve_diffusers_source(path_or_hub_id: str | Path, subfolder: str = "") -> str:
    """A local folder (checked now, with a clear error) or a hub id passed through to diffusers."""
    text = str(path_or_hub_id)
    path = Path(text).expanduser()
    looks_local = isinstance(path_or_hub_id, Path) or text.startswith(("/", ".", "~")) or text.count("/") != 1
    if path.exists() or looks_local:
        config = path / subfolder / "config.json"
        if not config.is_file():
            hint = ""
            if not subfolder and (path / "vae" / "config.json").is_file():
                hint = "; this looks like a pipeline folder: set codec.subfolder=vae"
            elif not subfolder and (path / "model_index.json").is_file():
                hint = "; this is a pipeline folder: set codec.subfolder to its VAE's folder (usually vae)"
            raise FileNotFoundError(
                f"AutoencoderKL config not found: {config}. codec.path must be a folder written by "
                f"AutoencoderKL.save_pretrained (config.json + weights), a pipeline folder with "
                f"codec.subfolder, or a hub id such as 'org/name'{hint}")
        return str(path)
    return text


def _weights_identity(source: str) -> str:
    """What makes a VAE unique: the weight bytes of a local folder, or the hub id."""
    folder = Path(source)
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) if folder.is_dir() else []
    if not files:
        return source
    h = hashlib.sha1()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _digest(*parts: object) -> str:
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:10]
