"""Small building blocks: RMSNorm, rotary embeddings, SwiGLU, timestep embedding, patchify."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class SwiGLU(nn.Module):
    """Llama feed-forward: w2(silu(w1 x) * w3 x), with w1 and w3 fused into one matmul."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


def ffn_hidden_dim(dim: int, multiple_of: int = 64) -> int:
    """Llama's SwiGLU width: 2/3 of 4*dim, rounded up to a multiple (same FLOPs as a 4x GELU MLP)."""
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class Rotary(nn.Module):
    """1-D rotary position embedding; positions are given per token (they restart in every document)."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position (B, T) -> cos, sin of shape (B, 1, T, head_dim / 2)."""
        angles = position.float()[..., None] * self.inv_freq  # (B, T, hd/2)
        return angles.cos()[:, None], angles.sin()[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, hd): rotate channel pairs (first half, second half)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.type_as(x)


def grid_sincos(counts: torch.Tensor, widths: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """(sum(counts), dim) fixed 2-D sin-cos position of every patch: span s holds ``counts[s]`` patches in
    raster order on a grid ``widths[s]`` wide; the first half of the channels encodes the row, the second
    the column (sin and cos over dim / 4 frequencies each, as DiT's patch positions)."""
    total = int(counts.sum())
    start = torch.cumsum(counts, 0) - counts  # (S,) first patch of each span
    local = torch.arange(total, device=counts.device) - start.repeat_interleave(counts, output_size=total)
    width = widths.to(counts.device).repeat_interleave(counts, output_size=total)
    quarter = dim // 4
    freqs = base ** (-torch.arange(quarter, device=counts.device, dtype=torch.float32) / quarter)  # (dim/4,)
    parts = []
    for coord in (local // width, local % width):  # row, column
        angles = coord.float()[:, None] * freqs  # (P, dim/4)
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=-1)


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of t in [0, 1] (scaled by 1000, as diffusers' timesteps are) -> MLP -> dim."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = 1000.0 * t.float()[:, None] * freqs  # (N, half)
        emb = torch.cat([args.cos(), args.sin()], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


def patchify(latents: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, h, w) -> (N, h/p * w/p, C*p*p), patches in raster order."""
    n, c, h, w = latents.shape
    x = latents.reshape(n, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(n, (h // p) * (w // p), c * p * p)


def unpatchify(patches: torch.Tensor, p: int, c: int, h: int, w: int) -> torch.Tensor:
    """Inverse of patchify: (N, h/p * w/p, C*p*p) -> (N, C, h, w)."""
    n = patches.shape[0]
    x = patches.reshape(n, h // p, w // p, c, p, p)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)


def patch_counts(shape: torch.Tensor, p: int) -> torch.Tensor:
    """(N, 3) latent shapes (C, h, w) -> (N,) patches per image."""
    return (shape[:, 1] // p) * (shape[:, 2] // p)


def patchify_each(latents, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents of any sizes -> their patches, flat, image after image (P, C*p*p), and their shapes (N, 3).

    ``latents``: a sequence of (C, h, w) tensors (sizes may differ) or one (N, C, h, w) tensor. Images of
    different sizes share a packed batch this way, with no stack of equal shapes (issue 21, item 2)."""
    if isinstance(latents, torch.Tensor):
        n, c, h, w = latents.shape
        shape = torch.tensor([[c, h, w]] * n, dtype=torch.long).reshape(n, 3)
        return patchify(latents, p).reshape(-1, c * p * p), shape
    if not latents:
        raise ValueError("patchify_each needs at least one latent (or an (N, C, h, w) tensor)")
    flat = [patchify(x[None], p)[0] for x in latents]  # each (h/p * w/p, C*p*p)
    shape = torch.tensor([list(x.shape) for x in latents], dtype=torch.long)
    return torch.cat(flat), shape


def unpatchify_each(patches: torch.Tensor, shape: torch.Tensor, p: int) -> list[torch.Tensor]:
    """Inverse of patchify_each: flat patches (P, C*p*p) and shapes (N, 3) -> N latents (C, h, w)."""
    counts = patch_counts(shape, p).tolist()
    return [unpatchify(x[None], p, c, h, w)[0]
            for x, (c, h, w) in zip(patches.split(counts), shape.tolist())]
