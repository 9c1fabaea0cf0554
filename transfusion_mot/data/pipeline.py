"""From a config to training batches: records -> prepared examples -> latents -> packed ``Batch``.

Determinism is the design: the example at global position ``p`` (its record, caption choice,
caption-first or image-first order, caption dropout, crop, and its image's t and noise via
``image_seed = p``) depends only on ``(seed, p)``, and each of those draws reads its own stream
(``rng.py``), so none is a function of another. Batch ``g`` on rank ``r`` of ``W`` takes positions
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

import numpy as np
import torch

from .. import rng
from ..config import Config, DataConfig
from .packing import Batch, Specials, pack
from .sources import SkipStats
from .segments import Image, ImageTokens, Record, Text


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
    if cfg.source in ("webdataset", "latents"):  # streamed shards (data/streaming.py), split by shard
        from .streaming import shard_records

        return shard_records(cfg, split)
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
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its permutation of the records)

    def __len__(self) -> int:
        return 2 ** 62  # an endless stream; the trainer stops it

    def positions(self, g: int) -> range:
        start = (g * self.world + self.rank) * self.per_batch
        return range(start, start + self.per_batch)

    def record_index(self, p: int) -> int:
        """Position -> record index: a fresh permutation of the records every epoch."""
        n = len(self.records)
        epoch, i = divmod(p, n)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, rng.stream(self.seed, epoch, purpose="order").permutation(n))
        return int(self._order[1][i])

    def prepare(self, p: int, skips: SkipStats, record: Record | None = None) -> Prepared | None:
        from .sources import BadRecord

        if record is None:
            try:
                record = self.records[self.record_index(p)]
            except BadRecord as bad:  # unreadable image, empty caption: counted, never fatal
                skips.add(bad.reason, bad.key)
                return None
        crop = rng.torch_generator(self.seed, p, purpose="crop") if self.data.crop == "random" else None
        pixels = self.transform(record.image, generator=crop)
        if pixels is None:
            skips.add("too_small", record.key)
            return None
        caption = record.captions[int(rng.stream(self.seed, p, purpose="caption").integers(len(record.captions)))]
        ids = self.tokenizer.encode(caption)[: self.data.max_caption_tokens]
        caption_first = bool(rng.stream(self.seed, p, purpose="caption_first").random() < self.data.caption_first)
        if caption_first and rng.stream(self.seed, p, purpose="dropout").random() < self.data.caption_dropout:
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
        if cfg.model.setting == "chameleon":  # VQ ids (h, w): exact in the cache's float32 (codebooks <= 2**20)
            img = ImageTokens(lat.round().long(), conditions_text=not prep.caption_first)
        else:
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
        self.empty_batches = 0
        self._unusable = 0  # this rank's positions since its last usable example
        workers = cfg.data.num_workers
        self.loader = torch.utils.data.DataLoader(
            source, batch_size=None, sampler=_Counter(start), num_workers=workers,
            collate_fn=lambda x: x, persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
        self._it = iter(self.loader)

    def _epoch_of(self, g: int) -> int:
        return self.source.positions(g).start // max(len(self.source.records), 1)

    def __next__(self) -> Batch:
        """The next batch. One whose records were all skipped is skipped too (counted and reported), so
        training goes on and a resume never meets it again; after four epochs' worth of this rank's
        positions without one usable record, the source has nothing usable: a clear stop."""
        while True:
            prepared, skips = next(self._it)
            self.skips.merge(skips)
            self.next_index += 1
            epoch = self._epoch_of(self.next_index)
            if epoch > self.epoch:
                self.epoch = epoch
                if self.skips.total:
                    self.report(f"epoch {epoch - 1} of the data: {self.skips.report()}")
            if prepared:
                self._unusable = 0
                return collate_batch(prepared, self.encode, self.cfg, self.specials)
            self.empty_batches += 1
            self._unusable += self.source.per_batch
            self.report(f"batch {self.next_index - 1}: all {self.source.per_batch} records skipped, going on "
                        f"({self.skips.report()})")
            if self._unusable >= 4 * len(self.source.records):
                from .streaming import NoUsableData

                raise NoUsableData(f"{_records_name(self.source.records)}: no usable record in "
                                   f"{self._unusable} positions (4 epochs' worth); {self.skips.report()}")

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        """Map-style data needs no state beyond the batch index (``TrainState.next_batch``)."""
        return {}


def build_stream(records, tokenizer, encode, cfg: Config, specials: Specials, rank: int = 0, world: int = 1,
                 start: int = 0, state: dict | None = None, report=print, gather=None):
    """The training batch stream for ``records``: map-style sources through ``ExampleSource`` +
    ``BatchStream``; shards through the resumable lanes of data/streaming.py. ``start`` is the batch
    index to resume at, ``state`` the stream's saved ``state_dict()``; ``gather`` collects a list from
    every rank (accelerate's ``gather_object``) so the main process saves every rank's lanes."""
    from .streaming import ShardBatchStream, ShardSource, StreamExamples

    if isinstance(records, ShardSource):
        if start and not state:
            raise ValueError(f"the checkpoint is at batch {start} but holds no shard-stream position "
                             f"(saved for a map-style source?); cannot resume {records.name} exactly")
        examples = StreamExamples(records, tokenizer, cfg, rank, world, state)
        return ShardBatchStream(examples, encode, cfg, specials, start, report, gather)
    if state:
        raise ValueError(f"the checkpoint's data position belongs to a shard stream, but {_records_name(records)} "
                         "is a map-style source; resume with the data it was trained on")
    return BatchStream(ExampleSource(records, tokenizer, cfg, rank, world), encode, cfg, specials, start, report)


def _is_shards(records) -> bool:
    from .streaming import ShardSource

    return isinstance(records, ShardSource)


def iter_records(records, skips: SkipStats | None = None):
    """Every usable record in source order (held-out sets, VAE images); bad ones go into ``skips``."""
    from .sources import BadRecord

    skips = SkipStats() if skips is None else skips
    if _is_shards(records):  # a shard stream: read in order, no index
        yield from records.records(skips)
        return
    for i in range(len(records)):
        try:
            yield records[i]
        except BadRecord as bad:
            skips.add(bad.reason, bad.key)


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
    parts.append({"images": "rng"})  # records drawn from their own stream (rng.py), not by a fixed stride
    spec = json.dumps(parts)
    return "vae-" + hashlib.sha1(spec.encode()).hexdigest()[:12]


def _vae_images(records, resolution: int, batch_size: int = 16, seed: int = 0, skips: SkipStats | None = None):
    """``images(step)`` for VAE training: centre-cropped pixels of records, skipping bad ones into ``skips``.

    Map-style records are drawn at random from the step's own stream, shards read in order; either way
    a source in which every record has failed (or a full pass over the shards without one usable image)
    is a ``NoUsableData`` stop, not an endless search.
    """
    from .sources import BadRecord, ImageTransform
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
                px = tf(rec.image)
                if px is None:
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
    c = cfg.codec
    kwargs = dict(resolution=cfg.data.resolution, steps=c.vae_steps, channels=tuple(c.vae_channels),
                  latent_channels=c.vae_latent_channels, seed=cfg.train.seed, name=_records_name(records),
                  latent_noise=c.vae_latent_noise, chroma_weight=c.vae_chroma_weight)
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
        cache = LatentCache(_cache_root(cfg) / "latents", _records_name(records), codec.name, cfg.data.resolution)
    return codec, CachedEncoder(codec, cache)


def load_run_codec(cfg: Config, run_dir: Path):
    """The codec a finished run used (its own ``vae/`` copy for trained VAEs)."""
    from .codec import load_codec

    if cfg.codec.kind == "vq" and cfg.model.setting == "chameleon":
        from .vq_train import load_run_tokenizer

        return load_run_tokenizer(cfg, run_dir)
    if cfg.codec.kind == "trained":
        local = Path(run_dir) / "vae"
        if not local.exists() and cfg.data.source == "latents" and not cfg.codec.path:
            from .encode import codec_for_latents  # the codec encode.json names (while the data is there)

            return codec_for_latents(cfg)[0]
        path = local if local.exists() else Path(cfg.codec.path)
        return load_codec(replace(cfg.codec, path=str(path)))
    return load_codec(cfg.codec)


@torch.no_grad()
def encode_records(records, cfg: Config, tokenizer, codec, n: int, batch_size: int = 32) -> list:
    """The first ``n`` good records as held-out ``Pair``s: centre crop, first caption, clean latents
    (encoded shards already hold both)."""
    from ..metrics.validation import Pair
    from .sources import ImageTransform

    tf = ImageTransform(cfg.data.resolution, crop="center")
    latent_shards = getattr(records, "latents", False)
    pixels, ids = [], []
    for rec in iter_records(records):
        if len(pixels) == n:
            break
        px = rec.image if latent_shards else tf(rec.image)
        if px is None or not rec.captions:
            continue
        pixels.append(px)
        ids.append((rec.meta["ids"][0] if latent_shards else tokenizer.encode(rec.captions[0]))
                   [: cfg.data.max_caption_tokens])
    if not pixels:
        raise ValueError(f"no usable held-out records in {_records_name(records)}")
    if latent_shards:
        return [Pair(lat, x) for lat, x in zip(pixels, ids)]
    device = next(codec.parameters()).device
    latents = torch.cat([codec.encode(torch.stack(pixels[i:i + batch_size]).to(device)).float().cpu()
                         for i in range(0, len(pixels), batch_size)])
    return [Pair(lat, x) for lat, x in zip(latents, ids)]
