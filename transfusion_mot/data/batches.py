"""Training batches: records -> prepared examples (workers) -> latents -> packed ``Batch`` (main process).

Determinism is the design: the example at global position ``p`` (its record, caption choice,
caption-first or image-first order, caption dropout, crop, and its image's t and noise via
``image_seed = p``) depends only on ``(seed, p)``, and each of those draws reads its own stream
(``rng.py``), so none is a function of another. Batch ``g`` on rank ``r`` of ``W`` takes positions
``[(g W + r) E, (g W + r + 1) E)``. So resuming at batch g replays exactly, and W ranks see the same
examples as one process with W times the batch (tested to 1e-5).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .. import rng
from ..config import Config
from .packing import Batch, Specials, pack
from .records import _records_name
from .segments import Image, ImageTokens, Record, Text
from .sources import SkipStats


@dataclass
class Prepared:
    """One example before encoding: pixels, caption ids and its order."""

    position: int
    key: str
    pixels: torch.Tensor | None  # (3, H, W) in [0, 1]: (R, R), or the image's bucket with data.buckets; None: no image
    caption_ids: list[int]
    caption_first: bool
    extras: list = field(default_factory=list)  # the record's plug-in segments (``Record.extras``)


def layout(cfg: Config) -> tuple[int, int]:
    """(longest document, documents per row) so that ``batch_size`` rows always hold E examples (the
    longest image: the largest of ``data.buckets`` when set; plus the source's plug-in positions,
    ``SourceSpec.extra_positions``)."""
    from ..config_checks import longest_document

    longest, n_patches, n_extra = longest_document(cfg)
    per_row = max(1, cfg.data.seq_len // longest)
    if longest > cfg.data.seq_len:
        raise ValueError(f"data.seq_len={cfg.data.seq_len} < longest document {longest} "
                         f"(data.max_caption_tokens={cfg.data.max_caption_tokens} + {n_patches} patches + 4 markers"
                         + (f" + {n_extra} plug-in positions of data.source={cfg.data.source}" if n_extra else "") + ")")
    return longest, per_row


def examples_per_batch(cfg: Config) -> int:
    return cfg.data.batch_size * layout(cfg)[1]


class ExampleSource(torch.utils.data.Dataset):
    """Map-style: item ``g`` is the list of ``Prepared`` examples of batch g on this rank.

    Runs in DataLoader workers: decoding, cropping and tokenising happen there; encoding to latents
    happens in the main process, batched, through the codec and the latent cache.
    """

    def __init__(self, records, tokenizer, cfg: Config, rank: int = 0, world: int = 1, seed: int | None = None):
        from .transform import ImageTransform

        self.records, self.tokenizer, self.data = records, tokenizer, cfg.data
        self.seed = cfg.train.seed if seed is None else seed
        self.rank, self.world = rank, world
        self.per_batch = examples_per_batch(cfg)
        self.transform = ImageTransform(cfg.data.resolution, crop=cfg.data.crop, buckets=cfg.data.buckets)
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
        pixels = None if record.image is None else self.transform(record.image, generator=crop)
        if pixels is None and record.image is not None:
            skips.add("too_small", record.key)
            return None
        caption = record.captions[int(rng.stream(self.seed, p, purpose="caption").integers(len(record.captions)))]
        ids = self.tokenizer.encode(caption)[: self.data.max_caption_tokens]
        caption_first = bool(rng.stream(self.seed, p, purpose="caption_first").random() < self.data.caption_first)
        if caption_first and rng.stream(self.seed, p, purpose="dropout").random() < self.data.caption_dropout:
            ids = []
        return Prepared(p, record.key, pixels, ids, caption_first, list(record.extras))

    def __getitem__(self, g: int) -> tuple[list[Prepared], SkipStats]:
        """Batch g's examples, and the records skipped on the way (workers report them this way)."""
        skips = SkipStats()
        examples = [ex for p in self.positions(g) if (ex := self.prepare(p, skips)) is not None]
        return examples, skips


def collate_batch(prepared: list[Prepared], encode, cfg: Config, specials: Specials) -> Batch:
    """Encode pixels to latents (one batched call per image shape) and pack into exactly ``data.batch_size`` rows.
    A record's plug-in segments follow its image (caption first: text, image, plug-ins; else image, plug-ins,
    text); the example's data position keys their t / noise as it keys the image's."""
    if not prepared:
        raise RuntimeError("a whole batch of records was skipped as unreadable; check the data source")
    with_image = [p for p in prepared if p.pixels is not None]  # records of plug-ins and text only have none
    latents = iter(encode_by_shape(encode, [p.key for p in with_image], [p.pixels for p in with_image]))
    examples = []
    for prep in prepared:
        lat = next(latents) if prep.pixels is not None else None
        if lat is None:
            img = []
        elif cfg.model.setting == "chameleon":  # VQ ids (h, w): exact in the cache's float32 (codebooks <= 2**20)
            img = [ImageTokens(lat.round().long(), conditions_text=not prep.caption_first)]
        else:
            img = [Image(lat, conditions_text=not prep.caption_first)]
        text = Text(prep.caption_ids)
        examples.append([text, *img, *prep.extras] if prep.caption_first else [*img, *prep.extras, text])
    return pack(examples, cfg.data.seq_len, specials, cfg.model.patch_size, n_rows=cfg.data.batch_size,
                image_seeds=[[p.position] for p in prepared], example_keys=[p.position for p in prepared],
                extra_modalities=cfg.model.extra_modalities)


def encode_by_shape(encode, keys: list[str], pixels: list[torch.Tensor]) -> list[torch.Tensor]:
    """``encode(keys, (M, 3, H, W)) -> (M, C, h, w)`` run once per distinct image shape (aspect-ratio buckets
    put several in one batch); the latents come back in the order of ``keys``."""
    groups: dict[tuple, list[int]] = {}
    for i, px in enumerate(pixels):
        groups.setdefault(tuple(px.shape), []).append(i)
    out: list = [None] * len(keys)
    for members in groups.values():
        for i, lat in zip(members, encode([keys[i] for i in members], torch.stack([pixels[i] for i in members]))):
            out[i] = lat
    return out


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


class _Counter(torch.utils.data.Sampler):
    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        i = self.start
        while True:
            yield i
            i += 1
