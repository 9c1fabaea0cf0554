"""TAEF2, the tiny autoencoder for the FLUX.2 latent space, written from the layout in shared/assets/MANIFEST.md.

Both networks are ``nn.Sequential`` so that the upstream ``.pth`` state dicts (flat, keyed by
Sequential index) load with ``strict=True``. Images are RGB in [0, 1]; latents are raw
(32 channels at 1/8 size, roughly in [-3, 3], no scale or shift).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

LATENT_CHANNELS = 32
DOWNSAMPLE = 8
_WIDTH = 64


def _conv(c_in: int, c_out: int, bias: bool = True, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


class ResBlock(nn.Module):
    """conv-ReLU-conv-ReLU-conv plus identity, then ReLU.

    With ``global_norm`` the input is first updated by a 1x1 bottleneck through GroupNorm: the
    per-image spatial statistics this brings in are what TAEF2 needed to distil FLUX.2 faithfully.
    """

    def __init__(self, channels: int = _WIDTH, global_norm: bool = False):
        super().__init__()
        self.pool = nn.Sequential(
            nn.Conv2d(channels, 4 * channels, 1, bias=False),
            nn.GroupNorm(4, 4 * channels),
            nn.ReLU(),
            nn.Conv2d(4 * channels, channels, 1, bias=False),
        ) if global_norm else None
        self.conv = nn.Sequential(_conv(channels, channels), nn.ReLU(), _conv(channels, channels), nn.ReLU(),
                                  _conv(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W)
        if self.pool is not None:
            x = x + self.pool(x)
        return torch.relu(self.conv(x) + x)


class SoftClamp(nn.Module):
    """3 tanh(z / 3): keeps out-of-range latents (e.g. from a generator) from blowing up the decoder."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return 3.0 * torch.tanh(z / 3.0)


def build_encoder() -> nn.Sequential:
    """(N, 3, H, W) in [0, 1] -> (N, 32, H/8, W/8) raw latents; indices 0..14 as in the weights."""
    layers: list[nn.Module] = [_conv(3, _WIDTH), ResBlock()]
    for stage in range(3):
        layers.append(_conv(_WIDTH, _WIDTH, bias=False, stride=2))
        layers += [ResBlock(global_norm=stage == 2) for _ in range(3)]
    layers.append(_conv(_WIDTH, LATENT_CHANNELS))
    return nn.Sequential(*layers)


def build_decoder() -> nn.Sequential:
    """(N, 32, h, w) raw latents -> (N, 3, 8h, 8w) roughly in [0, 1]; indices 0..19 as in the weights."""
    layers: list[nn.Module] = [SoftClamp(), _conv(LATENT_CHANNELS, _WIDTH), nn.ReLU()]
    for stage in range(3):
        layers += [ResBlock(global_norm=stage == 0) for _ in range(3)]
        layers += [nn.Upsample(scale_factor=2, mode="nearest"), _conv(_WIDTH, _WIDTH, bias=False)]
    layers += [ResBlock(), _conv(_WIDTH, 3)]
    return nn.Sequential(*layers)


def _load_into(module: nn.Module, path: str | Path, what: str, arg: str) -> nn.Module:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"TAEF2 {what} weights not found: {path}. Put taef2_{what}.pth from github.com/madebyollin/taesd "
            f"at that path, or pass {arg}=<path to taef2_{what}.pth>")
    state = torch.load(path, map_location="cpu", weights_only=True)
    module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return module.float()


def load_encoder(path: str | Path) -> nn.Sequential:
    return _load_into(build_encoder(), path, "encoder", "codec.encoder_path")


def load_decoder(path: str | Path) -> nn.Sequential:
    return _load_into(build_decoder(), path, "decoder", "codec.decoder_path")
