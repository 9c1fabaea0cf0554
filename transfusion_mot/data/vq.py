"""``ImageTokenizer``: pixels <-> discrete image tokens through a diffusers ``VQModel`` (the Chameleon setting).

Pixels are (N, 3, H, W) in [0, 1], as for ``LatentCodec``; tokens are ids ``(N, H/d, W/d)`` (long) into a
codebook of ``codebook_size`` entries, row-major over the token grid. Encoding quantises with the
VQModel's own ``VectorQuantizer`` (nearest codebook entry), so ids are deterministic and are the codes
the VQModel itself would decode. Two sources of weights: the small VQModel ``vq_train`` trains on the
run's data (cached like the small VAE), or a pretrained VQModel in a local folder, e.g. the ``vqvae/``
folder of a pipeline (``codec.path`` + ``codec.subfolder``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..config import CodecConfig
from .codec import PixelCodec, _digest, _weights_identity


class _VQBackend(nn.Module):
    """A VQModel, which works on [-1, 1] images; ids are its quantiser's nearest codebook entries."""

    def __init__(self, vq: nn.Module):
        super().__init__()
        self.vq = vq

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) in [0, 1] -> (N, h, w) long
        h = self.vq.encode(pixels * 2 - 1).latents  # (N, D, h, w), after quant_conv
        _, _, (_, _, ids) = self.vq.quantize(h)  # (N h w,) or (N, h, w)
        return ids.reshape(h.shape[0], *h.shape[2:])

    def decode(self, ids: torch.Tensor) -> torch.Tensor:  # (N, h, w) long -> (N, 3, H, W) in ~[0, 1]
        quantize = self.vq.quantize
        quant = quantize.get_codebook_entry(ids.reshape(-1), (*ids.shape, quantize.vq_embed_dim))  # (N, D, h, w)
        spatial = quant if self.vq.config.norm_type == "spatial" else None  # as VQModel.decode passes it
        return (self.vq.decoder(self.vq.post_quant_conv(quant), spatial) + 1) / 2


class ImageTokenizer(PixelCodec):
    """Discrete image tokens in and out, batched and gradient-free.

    ``name`` identifies the weights, so token caches keyed by it never mix two tokenizers' ids.
    """

    def __init__(self, vq: nn.Module, name: str, batch_size: int = 64):
        super().__init__(_VQBackend(vq), 2 ** (len(vq.config.block_out_channels) - 1), name, batch_size)
        self.codebook_size = int(vq.config.num_vq_embeddings)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, H/d, W/d) long ids in [0, codebook_size) on the tokenizer's device."""
        self._check_pixels(pixels)
        dtype = self._param().dtype
        return self._batched(lambda chunk: self.backend.encode(chunk.to(dtype)), pixels).long()

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """(N, h, w) ids -> (N, 3, h d, w d) float32 pixels clamped to [0, 1]."""
        if ids.ndim != 3 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"decode expects integer ids of shape (N, h, w), got {ids.dtype} {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.codebook_size):
            raise ValueError(f"decode: ids must lie in [0, {self.codebook_size}) for tokenizer {self.name!r}, "
                             f"got [{int(ids.min())}, {int(ids.max())}]")
        return self._batched(lambda chunk: self.backend.decode(chunk.long()).float(), ids).clamp_(0, 1)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, codebook_size={self.codebook_size}, downsample={self.downsample}"

    @classmethod
    def from_pretrained(cls, path: str | Path, subfolder: str = "") -> ImageTokenizer:
        """A VQModel saved with ``save_pretrained`` in ``path`` (or in ``path/subfolder``), loaded offline."""
        from diffusers import VQModel

        folder = Path(path).expanduser() / subfolder if subfolder else Path(path).expanduser()
        config = folder / "config.json"
        if not config.is_file():
            hint = "" if subfolder else " (a pipeline folder keeps it in a subfolder: set codec.subfolder, e.g. vqvae)"
            raise FileNotFoundError(f"VQModel config not found: {config}. codec.path must be a local folder written "
                                    f"by VQModel.save_pretrained (config.json + weights){hint}")
        try:
            kind = json.loads(config.read_text()).get("_class_name", "VQModel")
        except (json.JSONDecodeError, AttributeError) as err:
            raise ValueError(f"{config}: not a readable diffusers config ({err})") from err
        if kind != "VQModel":
            raise ValueError(f"{config}: holds a {kind}, not a VQModel (codec.kind=vq needs discrete codes; "
                             f"an AutoencoderKL is codec.kind=diffusers)")
        try:
            vq = VQModel.from_pretrained(str(Path(path).expanduser()), subfolder=subfolder or None).float()
        except (OSError, EnvironmentError) as err:  # config without weights
            raise FileNotFoundError(f"could not load the VQModel in {folder}: {err}") from err
        return cls(vq, "vq-" + _digest(_weights_identity(str(folder))))


def load_image_tokenizer(cfg: CodecConfig) -> ImageTokenizer:
    """The tokenizer in ``codec.path`` (+ ``codec.subfolder``). Training one when there is no path is
    the pipeline's job: ``vq_train.image_tokenizer_for``."""
    if cfg.kind != "vq":
        raise ValueError(f"codec.kind={cfg.kind!r} is a continuous-latent codec (data/codec.py); "
                         f"discrete image tokens need codec.kind=vq")
    if not cfg.path:
        raise ValueError("codec.kind=vq without codec.path: train one with vq_train.image_tokenizer_for(cfg), "
                         "or set codec.path=<folder holding a VQModel>")
    return ImageTokenizer.from_pretrained(cfg.path, cfg.subfolder)


@torch.no_grad()
def code_usage(ids: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """How much of the codebook ``ids`` use: perplexity (exp of the code entropy; = codebook_size when
    every code is equally frequent) and the number and fraction of codes used at least once."""
    counts = torch.bincount(ids.reshape(-1).long().cpu(), minlength=codebook_size).double()  # (K,)
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    used = int((counts > 0).sum())
    return {"perplexity": float(entropy.exp()), "codes_used": used, "code_usage": used / codebook_size}
