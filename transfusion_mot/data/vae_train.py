"""Train the project's own small ``AutoencoderKL`` (the default codec for shapes) in a few CPU minutes.

The VAE downsamples 4x (three blocks, two downsamplings) to a few latent channels. After training
we measure the latent mean/std on held-out batches and store ``shift = mean, scale = 1 / std`` in
codec.json, so the flow sees unit-variance latents. Everything is written to a temporary folder and
renamed into place, so a killed run never leaves a half VAE; a lock file makes racing processes
(several ranks, two jobs) train once and share the result.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from .codec import CODEC_JSON
from .latent_cache import resolve_cache_dir

ImageBatches = Callable[[int], torch.Tensor]  # step -> (B, 3, R, R) in [0, 1]

KL_WEIGHT = 1e-6  # keeps the latent means from drifting large; reconstruction dominates
EVAL_BATCHES = 4
_EVAL_STEP0 = 10_000_000  # held-out batches are requested at steps the training loop never reaches


def build_vae(channels: tuple[int, ...] = (32, 64, 64), latent_channels: int = 4, resolution: int = 64):
    """A small AutoencoderKL: len(channels) blocks -> 2 ** (len(channels) - 1) downsampling, no attention."""
    from diffusers import AutoencoderKL

    groups = math.gcd(*channels, 8)  # few, wide groups: GroupNorm with 32 groups of 1 channel trains badly
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels), block_out_channels=tuple(channels),
        layers_per_block=1, latent_channels=latent_channels, norm_num_groups=groups, sample_size=resolution,
        mid_block_add_attention=False, force_upcast=False)


def train_vae(images: ImageBatches, out_dir: str | Path, resolution: int, steps: int,
              channels: tuple[int, ...] = (32, 64, 64), latent_channels: int = 4, batch_size: int = 16,
              lr: float = 2e-3, seed: int = 0, name: str = "", train_crop: int | None = 32,
              latent_noise: float = 0.0, chroma_weight: float = 0.0,
              eval_images: ImageBatches | None = None) -> Path:
    """Train, measure latent statistics and PSNR, and write ``out_dir`` atomically; returns ``out_dir``.

    ``train_crop``: train on random square crops of this size. The VAE is convolutional, so crops teach
    it the same local job at a quarter of the cost at 64 px; statistics and PSNR use full images.
    ``latent_noise``: the decoder sees ``z + latent_noise * std(z) * eps``. Without it the encoder is free
    to pack colour onto one latent axis (measured: red, orange and yellow 0.14-0.33 apart at unit latent
    std), which reconstructs well but leaves a flow model that is slightly off decoding the wrong colour;
    with it, latents closer than the noise decode alike, so the encoder spreads them apart.
    ``chroma_weight``: each pixel's reconstruction loss is weighted by ``1 + chroma_weight * chroma`` of the
    target (max - min of RGB in [0, 1]), so small saturated objects count against a large grey background.
    ``eval_images``: held-out batches for those measurements; by default ``images(10_000_000 + i)``.
    """
    out_dir = Path(out_dir).expanduser()
    if steps <= 0:
        raise ValueError(f"vae steps must be positive, got {steps}")
    if train_crop and train_crop % 2 ** (len(channels) - 1):
        raise ValueError(f"train_crop={train_crop} must be a multiple of the VAE's downsampling factor")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    vae = build_vae(channels, latent_channels, resolution).train().to(memory_format=torch.channels_last)  # ~12% faster
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    from tqdm.auto import tqdm

    for step in tqdm(range(steps), desc=f"vae ({name or 'data'})", dynamic_ncols=True):
        x = training_batch(images, step, resolution, batch_size, train_crop, gen)  # (B, 3, c, c) in [-1, 1]
        x = x.contiguous(memory_format=torch.channels_last)
        posterior = vae.encode(x).latent_dist
        # Decode the posterior mode, as the codec does: sampling adds unit noise to the latents while
        # the log-variance is still near 0, which costs most of a 600-step budget to unlearn.
        z = posterior.mode()
        if latent_noise:
            z = z + latent_noise * z.detach().std() * torch.randn(z.shape, generator=gen).to(z.device)
        recon = vae.decode(z).sample
        loss = pixel_loss(recon, x, chroma_weight) + KL_WEIGHT * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
    vae.eval()
    held_out = eval_images or (lambda i: images(_EVAL_STEP0 + i))
    stats = measure(vae, [_check_batch(held_out(i), resolution, -1) for i in range(EVAL_BATCHES)])
    meta = {"name": name, "scaling_factor": 1.0 / stats["latent_std"], "shift_factor": stats["latent_mean"],
            **stats, "steps": steps, "resolution": resolution, "channels": list(channels),
            "latent_channels": latent_channels, "batch_size": batch_size, "train_crop": train_crop, "lr": lr, "seed": seed,
            "latent_noise": latent_noise, "chroma_weight": chroma_weight,
            "seconds": round(time.perf_counter() - start, 2)}
    vae.register_to_config(scaling_factor=meta["scaling_factor"], shift_factor=meta["shift_factor"])
    _write_atomically(vae, meta, out_dir)
    return out_dir


def pixel_loss(recon: torch.Tensor, x: torch.Tensor, chroma_weight: float = 0.0) -> torch.Tensor:
    """L1 + MSE per pixel and channel of [-1, 1] images, each pixel weighted by ``1 + chroma_weight * chroma``
    of the target (max - min of RGB in [0, 1]): small saturated shapes count against a large grey background."""
    err = (recon - x).abs() + (recon - x).pow(2)  # (B, 3, H, W)
    if chroma_weight:
        chroma = (x.amax(1, keepdim=True) - x.amin(1, keepdim=True)) / 2  # [-1, 1] images: /2 -> [0, 1]
        err = err * (1 + chroma_weight * chroma)
    return err.mean()


@torch.no_grad()
def measure(vae, batches: list[torch.Tensor]) -> dict[str, float]:
    """Held-out latent mean/std (posterior mode, as the codec encodes) and mean per-image PSNR in dB."""
    latents, psnrs = [], []
    for x in batches:
        z = vae.encode(x * 2 - 1).latent_dist.mode()  # (B, C, h, w)
        recon = ((vae.decode(z).sample + 1) / 2).clamp(0, 1)
        mse = (recon - x).pow(2).flatten(1).mean(1).clamp_min(1e-10)  # (B,)
        psnrs.append(-10 * torch.log10(mse))
        latents.append(z)
    z = torch.cat(latents)
    return {"latent_mean": z.mean().item(), "latent_std": z.std().item(), "psnr": torch.cat(psnrs).mean().item()}


def cached_vae_dir(cache_dir: str | Path, key: str, kind: str = "vae") -> Path:
    """Where the VAE for ``key`` lives: ``<cache_dir>/<kind>/<key>`` (cache_dir honours $TRANSFUSION_MOT_CACHE)."""
    if not key or "/" in key or key.startswith("."):
        raise ValueError(f"VAE cache key must be a plain, non-empty name, got {key!r}")
    return resolve_cache_dir(cache_dir) / kind / key


def get_or_train_vae(key: str, images: ImageBatches, cache_dir: str | Path, **train_kwargs) -> Path:
    """Reuse the cached VAE for ``key`` when complete, else train it there (safe when processes race)."""
    return get_or_train(key, images, cache_dir, train_vae, "vae", **train_kwargs)


def get_or_train(key: str, images: ImageBatches, cache_dir: str | Path, train: Callable[..., Path], kind: str,
                 **train_kwargs) -> Path:
    """``<cache_dir>/<kind>/<key>`` when complete (its codec.json written), else ``train(images, that
    folder, **train_kwargs)`` under a lock: the first process trains, racing ones wait and reuse it."""
    target = cached_vae_dir(cache_dir, key, kind)
    if (target / CODEC_JSON).is_file():
        return target
    with _file_lock(target.parent / f".{key}.lock"):
        if (target / CODEC_JSON).is_file():  # another process trained it while we waited
            return target
        train_kwargs.setdefault("name", key)
        return train(images, target, **train_kwargs)


def training_batch(images: ImageBatches, step: int, resolution: int, batch_size: int, train_crop: int,
                   gen: torch.Generator) -> torch.Tensor:
    """Step ``step``'s images for an autoencoder (VAE or VQ): checked, cut to ``batch_size``, randomly
    cropped to ``train_crop`` when that is smaller than the resolution, mapped to [-1, 1] as diffusers'
    autoencoders expect."""
    x = _check_batch(images(step), resolution, step)[:batch_size]  # (B, 3, R, R)
    if train_crop and train_crop < resolution:
        x = _random_crops(x, train_crop, gen)  # (B, 3, c, c)
    return x * 2 - 1


def _random_crops(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """(B, 3, R, R) -> (B, 3, size, size), an independent crop per image."""
    corners = torch.randint(x.shape[-1] - size + 1, (len(x), 2), generator=gen).tolist()
    return torch.stack([img[:, i:i + size, j:j + size] for img, (i, j) in zip(x, corners)])


def _check_batch(x: torch.Tensor, resolution: int, step: int) -> torch.Tensor:
    if x.ndim != 4 or x.shape[1] != 3 or x.shape[-2:] != (resolution, resolution):
        raise ValueError(f"images({step}) must return (B, 3, {resolution}, {resolution}) in [0, 1], "
                         f"got shape {tuple(x.shape)}")
    return x.float()


def _write_atomically(vae, meta: dict, out_dir: Path) -> None:
    """save_pretrained into a sibling temp dir, then rename it into place (replacing an older VAE there)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.new-"))
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    try:
        vae.save_pretrained(tmp)
        (tmp / CODEC_JSON).write_text(json.dumps(meta, indent=1))
        if out_dir.exists():
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock: one process trains, the others wait and then reuse its VAE."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
