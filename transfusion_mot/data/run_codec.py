"""A run's image codec: train (or reuse from the cache) the small VAE for the data, copy it into the run
dir, refuse a run dir's codec made for other data or settings, and wrap encoding with the latent cache."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from .. import rng
from ..config import CodecConfig, Config
from .records import _is_shards, _records_name, build_records
from .sources import SkipStats, source_spec
from .transform import ImageTransform, bucket_sizes, check_bucket_patches


VAE_LR = CodecConfig.vae_lr  # the default, which every VAE trained before codec.vae_lr existed used


def _cache_root(cfg: Config) -> Path:
    from .latent_cache import resolve_cache_dir

    return resolve_cache_dir(cfg.codec.cache_dir)


def vae_key(cfg: Config, records) -> str:
    """Cache key of the small VAE trained for this data: what it was trained on and how."""
    c = cfg.codec
    parts = [_records_name(records), cfg.data.resolution, c.vae_steps, c.vae_latent_channels,
             list(c.vae_channels), cfg.train.seed]
    if c.vae_latent_noise:  # appended only when set, so VAEs trained before the option keep their keys
        parts.append(c.vae_latent_noise)
    if c.vae_chroma_weight:
        parts.append({"chroma_weight": c.vae_chroma_weight})
    if c.vae_lr != VAE_LR:
        parts.append({"lr": c.vae_lr})
    parts.append({"images": "rng"})  # records drawn from their own stream (rng.py), not by a fixed stride
    spec = json.dumps(parts)
    return "vae-" + hashlib.sha1(spec.encode()).hexdigest()[:12]


def _vae_images(records, resolution: int, batch_size: int = 16, seed: int = 0, skips: SkipStats | None = None):
    """``images(step)`` for VAE training: centre-cropped pixels of records, skipping bad ones into ``skips``.

    Map-style records are drawn at random from the step's own stream, shards read in order; either way
    a source in which every record has failed (or a full pass over the shards without one usable image)
    is a ``NoUsableData`` stop, not an endless search.
    """
    from .sources import BadRecord
    from .streaming import NoUsableData

    tf = ImageTransform(resolution, crop="center")
    skips = SkipStats() if skips is None else skips
    name = _records_name(records)

    def none_usable(tried: int) -> NoUsableData:
        return NoUsableData(f"no usable image for VAE training in {name} ({tried} records tried; {skips.report()})")

    if _is_shards(records):  # shards: one pass after another, in order
        def passes():
            while True:
                found = 0
                for rec in records.records(skips):
                    px = tf(rec.image)
                    if px is None:
                        skips.add("too_small", rec.key)
                        continue
                    found += 1
                    yield px
                if not found:
                    raise none_usable(skips.total)

        stream = passes()
        return lambda step: torch.stack([next(stream) for _ in range(batch_size)])

    n = len(records)
    if n == 0:
        raise none_usable(0)

    failed: set[int] = set()

    def images(step: int) -> torch.Tensor:
        out, draw = [], rng.stream(seed, step, purpose="vae_images")
        while len(out) < batch_size:
            index = int(draw.integers(n))
            if index in failed:
                continue
            try:
                rec = records[index]
                px = tf(rec.image) if rec.image is not None else None  # a plug-in-only record: never drawn again
                if px is None and rec.image is not None:
                    skips.add("too_small", rec.key)
            except BadRecord as bad:
                skips.add(bad.reason, bad.key)
                px = None
            if px is not None:
                out.append(px)
                continue
            failed.add(index)  # each bad record is counted once and never drawn again
            if len(failed) == n:
                raise none_usable(n)
        return torch.stack(out)

    return images


def train_codec_for(cfg: Config, out: Path | None = None, records=None) -> Path:
    """Train (or reuse from the cache) the small AutoencoderKL for ``cfg.data`` (its training
    ``records`` when the caller has them); returns its folder."""
    from .vae_train import get_or_train_vae, train_vae

    records = build_records(cfg.data, "train") if records is None else records
    kwargs = vae_settings(cfg, records)
    if getattr(records, "latents", False):
        raise ValueError(f"data.source=latents: the shards in {cfg.data.path} are already encoded; set codec.* to "
                         "the codec that encoded them (as encode.json names it) instead of training a VAE")
    skips = SkipStats()
    images = _vae_images(records, cfg.data.resolution, seed=cfg.train.seed, skips=skips)
    kwargs["eval_images"] = _vae_images(build_records(cfg.data, "val"), cfg.data.resolution)  # PSNR on held-out
    if out is not None:
        path = train_vae(images, Path(out), **kwargs)
    else:
        path = get_or_train_vae(vae_key(cfg, records), images, _cache_root(cfg), **kwargs)
    if skips.total:
        print(f"VAE training on {_records_name(records)}: {skips.report()}")
    return path


def check_codec(codec, cfg: Config) -> None:
    """The model's latent shape must be what the codec produces at the data resolution, and every bucket
    must split into whole patches of the codec's latent pixels."""
    check_bucket_patches(bucket_sizes(cfg.data.buckets), codec.downsample, cfg.model.patch_size)
    size = cfg.data.resolution // codec.downsample
    if codec.latent_channels != cfg.model.latent_channels or size != cfg.model.latent_size:
        raise ValueError(
            f"codec gives {codec.latent_channels}x{size}x{size} latents at data.resolution={cfg.data.resolution} "
            f"but the model expects model.latent_channels={cfg.model.latent_channels}, "
            f"model.latent_size={cfg.model.latent_size}")


def vae_settings(cfg: Config, records) -> dict:
    """What the small VAE for ``cfg`` is trained with (``train_vae``'s arguments), which its codec.json
    records and a run dir's VAE must match (``check_run_codec``)."""
    c = cfg.codec
    return {"name": _records_name(records), "resolution": cfg.data.resolution, "steps": c.vae_steps,
            "channels": tuple(c.vae_channels), "latent_channels": c.vae_latent_channels, "seed": cfg.train.seed,
            "latent_noise": c.vae_latent_noise, "chroma_weight": c.vae_chroma_weight, "lr": c.vae_lr}


# The fields of codec.json (vae_settings, as vae_train records them) with the config key each comes from;
# VAEs written before an option existed were trained without it.
_RUN_CODEC_FIELDS = {"name": "the data (data.source / data.path)", "resolution": "data.resolution",
                     "steps": "codec.vae_steps", "channels": "codec.vae_channels",
                     "latent_channels": "codec.vae_latent_channels", "seed": "train.seed",
                     "latent_noise": "codec.vae_latent_noise", "chroma_weight": "codec.vae_chroma_weight",
                     "lr": "codec.vae_lr"}
_RUN_CODEC_DEFAULTS = {"latent_noise": 0.0, "chroma_weight": 0.0, "lr": VAE_LR}


def check_run_codec(local: Path, cfg: Config, records) -> None:
    """``run_dir/vae`` is reused only for the VAE this config asks for: with ``codec.path``, a copy of that
    VAE (same codec.json); otherwise one trained on this data at this resolution with these knobs (the
    fields the cache key is made of). Anything else is refused, naming what differs."""
    from .codec import CODEC_JSON

    have = json.loads((local / CODEC_JSON).read_text())
    if cfg.codec.path:
        source = Path(cfg.codec.path).expanduser() / CODEC_JSON
        if source.is_file() and json.loads(source.read_text()) != have:
            raise ValueError(f"{local} holds another VAE than codec.path={cfg.codec.path} (their {CODEC_JSON} "
                             f"differ); a run dir keeps the codec it was started with: use a new train.out_dir")
        return
    want = {**vae_settings(cfg, records), "channels": list(cfg.codec.vae_channels)}  # codec.json holds a list
    differ = [f"{_RUN_CODEC_FIELDS[k]}: the VAE has {have.get(k, _RUN_CODEC_DEFAULTS.get(k))!r}, the config asks "
              f"for {v!r}" for k, v in want.items() if have.get(k, _RUN_CODEC_DEFAULTS.get(k)) != v]
    if differ:
        raise ValueError(f"{local} holds a VAE trained for other data or settings ({'; '.join(differ)}); a run "
                         "dir keeps the codec it was started with: use a new train.out_dir")


def prepare_codec(cfg: Config, run_dir: Path, accelerator=None, records=None):
    """The run's codec (a trained VAE is copied into ``run_dir/vae`` so the run is self-contained)
    and ``encode(keys, pixels) -> latents`` with the on-disk latent cache when enabled. ``records``:
    the training records, when the caller has built them (indexing a large source is not free)."""
    records = build_records(cfg.data, "train") if records is None else records
    from .codec import load_codec
    from .latent_cache import CachedEncoder, LatentCache

    main = accelerator is None or accelerator.is_main_process
    if getattr(records, "latents", False):  # encoded shards: the codec only decodes (samples, evaluation)
        from .encode import codec_for_latents

        codec, codec_cfg = codec_for_latents(cfg)
        if codec_cfg.kind == "trained" and main and not (run_dir / "vae" / "codec.json").exists():
            shutil.copytree(codec_cfg.path, run_dir / "vae.tmp", dirs_exist_ok=True)  # the run stays self-contained
            os.replace(run_dir / "vae.tmp", run_dir / "vae")
        if accelerator is not None:
            accelerator.wait_for_everyone()
        codec = codec.to(accelerator.device if accelerator is not None else "cpu")
        return codec.eval(), lambda keys, latents: latents
    if cfg.codec.kind == "vq" and cfg.model.setting == "chameleon":  # discrete image tokens
        from .vq_train import run_tokenizer

        codec = run_tokenizer(cfg, run_dir, accelerator, records)
    elif cfg.codec.kind == "trained":
        local = run_dir / "vae"
        if (local / "codec.json").exists():
            check_run_codec(local, cfg, records)  # a VAE left by another config is refused, before any work
        else:
            ctx = accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext()
            with ctx:
                src = Path(cfg.codec.path) if cfg.codec.path else train_codec_for(cfg, records=records)
            if main and not (local / "codec.json").exists():
                tmp = run_dir / "vae.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(src, tmp)
                os.replace(tmp, local)
            if accelerator is not None:
                accelerator.wait_for_everyone()
        codec = load_codec(replace(cfg.codec, path=str(local)))
    else:
        codec = load_codec(cfg.codec)
    if cfg.model.setting != "chameleon":
        check_codec(codec, cfg)
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    codec = codec.to(device).eval()
    cache = None
    streamed = _is_shards(records)  # shards at scale: one file per example does not scale; use `encode`
    if cfg.data.cache_latents and cfg.data.crop == "center" and not streamed:  # random crops change every epoch
        cache = LatentCache(_cache_root(cfg) / "latents", _records_name(records), codec.name, cfg.data.resolution,
                            bucket_sizes(cfg.data.buckets))
    return codec, CachedEncoder(codec, cache)


def load_run_codec(cfg: Config, run_dir: Path):
    """The codec a finished run used (its own ``vae/`` copy for trained VAEs)."""
    from .codec import load_codec

    if cfg.codec.kind == "vq" and cfg.model.setting == "chameleon":
        from .vq_train import load_run_tokenizer

        return load_run_tokenizer(cfg, run_dir)
    if cfg.codec.kind == "trained":
        local = Path(run_dir) / "vae"
        if not local.exists() and source_spec(cfg.data.source).encoded and not cfg.codec.path:
            from .encode import codec_for_latents  # the codec encode.json names (while the data is there)

            return codec_for_latents(cfg)[0]
        path = local if local.exists() else Path(cfg.codec.path)
        return load_codec(replace(cfg.codec, path=str(path)))
    return load_codec(cfg.codec)
