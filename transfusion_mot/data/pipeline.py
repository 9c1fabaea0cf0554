"""From a config to training batches: records -> prepared examples -> latents -> packed ``Batch``.

Determinism is the design: the example at global position ``p`` (its record, caption choice,
caption-first or image-first order, caption dropout, crop, and its image's t and noise via
``image_seed = p``) depends only on ``(seed, p)``. Batch ``g`` on rank ``r`` of ``W`` takes positions
``[(g W + r) E, (g W + r + 1) E)``. So resuming at batch g replays exactly, and W ranks see the same
examples as one process with W times the batch (tested to 1e-5).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..config import Config, DataConfig
from .packing import Batch, Specials, pack
from .sources import SkipStats
from .segments import Image, Record, Text


@dataclass
class Prepared:
    """One example before encoding: pixels, caption ids and its order."""

    position: int
    key: str
    pixels: torch.Tensor  # (3, R, R) in [0, 1]
    caption_ids: list[int]
    caption_first: bool


def layout(cfg: Config) -> tuple[int, int]:
    """(longest document, documents per row) so that ``batch_size`` rows always hold E examples."""
    n_patches = (cfg.model.latent_size // cfg.model.patch_size) ** 2
    longest = 2 + cfg.data.max_caption_tokens + n_patches + 2
    per_row = max(1, cfg.data.seq_len // longest)
    if longest > cfg.data.seq_len:
        raise ValueError(f"data.seq_len={cfg.data.seq_len} < longest document {longest} "
                         f"(data.max_caption_tokens={cfg.data.max_caption_tokens} + {n_patches} patches + 4 markers)")
    return longest, per_row


def examples_per_batch(cfg: Config) -> int:
    return cfg.data.batch_size * layout(cfg)[1]


def build_records(cfg: DataConfig, split: str = "train"):
    """The configured source as a map-style dataset of ``Record`` for ``split`` ("train" or "val").

    Shapes has its own disjoint splits. A real source with ``data.val_path`` uses that for "val";
    without one, its last ``data.val_fraction`` of records are held out from training.
    """
    if cfg.source == "shapes":
        from .shapes import ShapesDataset

        size = cfg.shapes_train_size if split == "train" else cfg.shapes_val_size
        return ShapesDataset(split=split, size=size, resolution=cfg.resolution,
                             max_shapes=cfg.shapes_max_shapes, textured=cfg.shapes_textured)
    from .sources import build_source

    def source(path):
        return build_source(cfg.source, path, captions=cfg.captions, image_column=cfg.image_column,
                            text_column=cfg.text_column, resolution=cfg.resolution)

    if split != "train" and cfg.val_path:
        return source(cfg.val_path)
    records = source(cfg.path)
    if cfg.val_path or cfg.val_fraction <= 0:
        return records
    n_val = max(1, int(len(records) * cfg.val_fraction))
    if n_val >= len(records):
        raise ValueError(f"data.val_fraction={cfg.val_fraction} leaves no training records in {cfg.path}")
    cut = len(records) - n_val
    return HeldOut(records, range(cut) if split == "train" else range(cut, len(records)), split)


class HeldOut(torch.utils.data.Dataset):
    """A contiguous part of a source (train or its held-out tail), keeping ``name`` and ``skips``."""

    def __init__(self, records, indices: range, split: str):
        self.records, self.indices = records, indices
        self.name = f"{_records_name(records)}[{split}]"
        self.skips = getattr(records, "skips", None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Record:
        return self.records[self.indices[i]]


class ExampleSource(torch.utils.data.Dataset):
    """Map-style: item ``g`` is the list of ``Prepared`` examples of batch g on this rank.

    Runs in DataLoader workers: decoding, cropping and tokenising happen there; encoding to latents
    happens in the main process, batched, through the codec and the latent cache.
    """

    def __init__(self, records, tokenizer, cfg: Config, rank: int = 0, world: int = 1, seed: int | None = None):
        from .sources import ImageTransform

        self.records, self.tokenizer, self.data = records, tokenizer, cfg.data
        self.seed = cfg.train.seed if seed is None else seed
        self.rank, self.world = rank, world
        self.per_batch = examples_per_batch(cfg)
        self.transform = ImageTransform(cfg.data.resolution, crop=cfg.data.crop)
        self.skips = SkipStats()  # found while indexing the source (e.g. a listed file that is missing)
        self.skips.merge(getattr(records, "skips", None) or SkipStats())

    def __len__(self) -> int:
        return 2 ** 62  # an endless stream; the trainer stops it

    def positions(self, g: int) -> range:
        start = (g * self.world + self.rank) * self.per_batch
        return range(start, start + self.per_batch)

    def record_index(self, p: int) -> int:
        """Position -> record index: a fresh permutation of the records every epoch."""
        n = len(self.records)
        epoch, i = divmod(p, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        return int(perm[i])

    def prepare(self, p: int, skips: SkipStats, record: Record | None = None) -> Prepared | None:
        from .sources import BadRecord

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + p)
        if record is None:
            try:
                record = self.records[self.record_index(p)]
            except BadRecord as bad:  # unreadable image, empty caption: counted, never fatal
                skips.add(bad.reason, bad.key)
                return None
        pixels = self.transform(record.image, generator=g)
        if pixels is None:
            skips.add("too_small", record.key)
            return None
        caption = record.captions[int(torch.randint(len(record.captions), (1,), generator=g))]
        ids = self.tokenizer.encode(caption)[: self.data.max_caption_tokens]
        caption_first = bool(torch.rand(1, generator=g) < self.data.caption_first)
        if caption_first and torch.rand(1, generator=g) < self.data.caption_dropout:
            ids = []
        return Prepared(p, record.key, pixels, ids, caption_first)

    def __getitem__(self, g: int) -> tuple[list[Prepared], SkipStats]:
        """Batch g's examples, and the records skipped on the way (workers report them this way)."""
        skips = SkipStats()
        examples = [ex for p in self.positions(g) if (ex := self.prepare(p, skips)) is not None]
        return examples, skips


def collate_batch(prepared: list[Prepared], encode, cfg: Config, specials: Specials) -> Batch:
    """Encode pixels to latents (one batched call) and pack into exactly ``data.batch_size`` rows."""
    if not prepared:
        raise RuntimeError("a whole batch of records was skipped as unreadable; check the data source")
    latents = encode([p.key for p in prepared], torch.stack([p.pixels for p in prepared]))
    examples = []
    for prep, lat in zip(prepared, latents):
        img = Image(lat, conditions_text=not prep.caption_first)
        text = Text(prep.caption_ids)
        examples.append([text, img] if prep.caption_first else [img, text])
    return pack(examples, cfg.data.seq_len, specials, cfg.model.patch_size, n_rows=cfg.data.batch_size,
                image_seeds=[[p.position] for p in prepared])


class BatchStream:
    """Iterates training batches from batch index ``start``; ``next_index`` is what a checkpoint keeps.

    Skipped records are summed here (from the workers) and reported once per epoch of the source.
    """

    def __init__(self, source: ExampleSource, encode, cfg: Config, specials: Specials, start: int = 0,
                 report=print):
        self.source, self.encode, self.cfg, self.specials = source, encode, cfg, specials
        self.next_index = start
        self.skips = SkipStats()
        self.skips.merge(source.skips)
        self.report = report
        self.epoch = self._epoch_of(start)
        workers = cfg.data.num_workers
        self.loader = torch.utils.data.DataLoader(
            source, batch_size=None, sampler=_Counter(start), num_workers=workers,
            collate_fn=lambda x: x, persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
        self._it = iter(self.loader)

    def _epoch_of(self, g: int) -> int:
        return self.source.positions(g).start // max(len(self.source.records), 1)

    def __next__(self) -> Batch:
        prepared, skips = next(self._it)
        self.skips.merge(skips)
        self.next_index += 1
        epoch = self._epoch_of(self.next_index)
        if epoch > self.epoch:
            self.epoch = epoch
            if self.skips.total:
                self.report(f"epoch {epoch - 1} of the data: {self.skips.report()}")
        return collate_batch(prepared, self.encode, self.cfg, self.specials)

    def __iter__(self):
        return self


class _Counter(torch.utils.data.Sampler):
    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        i = self.start
        while True:
            yield i
            i += 1


# --------------------------------------------------------------------------------------------------
# Tokenizer, codec and held-out pairs for a run
# --------------------------------------------------------------------------------------------------
def prepare_tokenizer(cfg: Config):
    from .tokenizer import build_tokenizer

    return build_tokenizer(cfg.data.tokenizer)


def _cache_root(cfg: Config) -> Path:
    from .latent_cache import resolve_cache_dir

    return resolve_cache_dir(cfg.codec.cache_dir)


def _records_name(records) -> str:
    return getattr(records, "name", type(records).__name__)


def vae_key(cfg: Config, records) -> str:
    """Cache key of the small VAE trained for this data: what it was trained on and how."""
    c = cfg.codec
    parts = [_records_name(records), cfg.data.resolution, c.vae_steps, c.vae_latent_channels,
             list(c.vae_channels), cfg.train.seed]
    if c.vae_latent_noise:  # appended only when set, so VAEs trained before the option keep their keys
        parts.append(c.vae_latent_noise)
    if c.vae_chroma_weight:
        parts.append({"chroma_weight": c.vae_chroma_weight})
    spec = json.dumps(parts)
    return "vae-" + hashlib.sha1(spec.encode()).hexdigest()[:12]


def _vae_images(records, resolution: int, batch_size: int = 16, seed: int = 0):
    """``images(step)`` for VAE training: centre-cropped pixels of records, skipping bad ones."""
    from .sources import BadRecord, ImageTransform

    tf = ImageTransform(resolution, crop="center")
    n = len(records)

    def images(step: int) -> torch.Tensor:
        out, i = [], step * batch_size
        while len(out) < batch_size:
            try:
                px = tf(records[(i * 7919 + seed) % n].image)
            except BadRecord:
                px = None
            if px is not None:
                out.append(px)
            i += 1
        return torch.stack(out)

    return images


def train_codec_for(cfg: Config, out: Path | None = None, records=None) -> Path:
    """Train (or reuse from the cache) the small AutoencoderKL for ``cfg.data`` (its training
    ``records`` when the caller has them); returns its folder."""
    from .vae_train import get_or_train_vae, train_vae

    records = build_records(cfg.data, "train") if records is None else records
    c = cfg.codec
    kwargs = dict(resolution=cfg.data.resolution, steps=c.vae_steps, channels=tuple(c.vae_channels),
                  latent_channels=c.vae_latent_channels, seed=cfg.train.seed, name=_records_name(records),
                  latent_noise=c.vae_latent_noise, chroma_weight=c.vae_chroma_weight)
    images = _vae_images(records, cfg.data.resolution, seed=cfg.train.seed)
    kwargs["eval_images"] = _vae_images(build_records(cfg.data, "val"), cfg.data.resolution)  # PSNR on held-out
    if out is not None:
        return train_vae(images, Path(out), **kwargs)
    return get_or_train_vae(vae_key(cfg, records), images, _cache_root(cfg), **kwargs)


def check_codec(codec, cfg: Config) -> None:
    """The model's latent shape must be what the codec produces at the data resolution."""
    size = cfg.data.resolution // codec.downsample
    if codec.latent_channels != cfg.model.latent_channels or size != cfg.model.latent_size:
        raise ValueError(
            f"codec gives {codec.latent_channels}x{size}x{size} latents at data.resolution={cfg.data.resolution} "
            f"but the model expects model.latent_channels={cfg.model.latent_channels}, "
            f"model.latent_size={cfg.model.latent_size}")


# The fields of codec.json (vae_train's record of a trained VAE) that key it, as ``vae_key`` keys the cache,
# with the config key each comes from; VAEs written before an option existed were trained without it.
_RUN_CODEC_FIELDS = {"name": "the data (data.source / data.path)", "resolution": "data.resolution",
                     "steps": "codec.vae_steps", "channels": "codec.vae_channels",
                     "latent_channels": "codec.vae_latent_channels", "seed": "train.seed",
                     "latent_noise": "codec.vae_latent_noise", "chroma_weight": "codec.vae_chroma_weight"}
_RUN_CODEC_DEFAULTS = {"latent_noise": 0.0, "chroma_weight": 0.0}


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
    c = cfg.codec
    want = {"name": _records_name(records), "resolution": cfg.data.resolution, "steps": c.vae_steps,
            "channels": list(c.vae_channels), "latent_channels": c.vae_latent_channels, "seed": cfg.train.seed,
            "latent_noise": c.vae_latent_noise, "chroma_weight": c.vae_chroma_weight}
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
    if cfg.codec.kind == "trained":
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
    check_codec(codec, cfg)
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    codec = codec.to(device).eval()
    cache = None
    if cfg.data.cache_latents and cfg.data.crop == "center":  # random crops change every epoch
        cache = LatentCache(_cache_root(cfg) / "latents", _records_name(records), codec.name, cfg.data.resolution)
    return codec, CachedEncoder(codec, cache)


def load_run_codec(cfg: Config, run_dir: Path):
    """The codec a finished run used (its own ``vae/`` copy for trained VAEs)."""
    from .codec import load_codec

    if cfg.codec.kind == "trained":
        local = Path(run_dir) / "vae"
        path = local if local.exists() else Path(cfg.codec.path)
        return load_codec(replace(cfg.codec, path=str(path)))
    return load_codec(cfg.codec)


@torch.no_grad()
def encode_records(records, cfg: Config, tokenizer, codec, n: int, batch_size: int = 32) -> list:
    """The first ``n`` good records as held-out ``Pair``s: centre crop, first caption, clean latents."""
    from ..metrics.validation import Pair
    from .sources import BadRecord, ImageTransform

    tf = ImageTransform(cfg.data.resolution, crop="center")
    pixels, ids = [], []
    for i in range(len(records)):
        if len(pixels) == n:
            break
        try:
            rec = records[i]
        except BadRecord:
            continue
        px = tf(rec.image)
        if px is None or not rec.captions:
            continue
        pixels.append(px)
        ids.append(tokenizer.encode(rec.captions[0])[: cfg.data.max_caption_tokens])
    if not pixels:
        raise ValueError(f"no usable held-out records in {_records_name(records)}")
    device = next(codec.parameters()).device
    latents = torch.cat([codec.encode(torch.stack(pixels[i:i + batch_size]).to(device)).float().cpu()
                         for i in range(0, len(pixels), batch_size)])
    return [Pair(lat, x) for lat, x in zip(latents, ids)]
