"""From a config to training batches: records -> prepared examples -> latents -> packed ``Batch``.

Determinism is the design: the example at global position ``p`` (its record, caption choice,
caption-first or image-first order, caption dropout, crop, and its image's t and noise via
``image_seed = p``) depends only on ``(seed, p)``. Batch ``g`` on rank ``r`` of ``W`` takes positions
``[(g W + r) E, (g W + r + 1) E)``. So resuming at batch g replays exactly, and W ranks see the same
examples as one process with W times the batch (tested to 1e-5).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import Config, DataConfig
from .packing import Batch, Specials, pack
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
    """The configured source as a map-style dataset of ``Record`` (or an iterable for webdataset)."""
    if cfg.source == "shapes":
        from .shapes import ShapesDataset

        size = cfg.shapes_train_size if split == "train" else cfg.shapes_val_size
        return ShapesDataset(split=split, size=size, resolution=cfg.resolution)
    from .sources import build_source

    path = cfg.val_path if (split != "train" and cfg.val_path) else cfg.path
    return build_source(cfg.source, path, captions=cfg.captions, image_column=cfg.image_column,
                        text_column=cfg.text_column, resolution=cfg.resolution)


class ExampleSource(torch.utils.data.Dataset):
    """Map-style: item ``g`` is the list of ``Prepared`` examples of batch g on this rank.

    Runs in DataLoader workers: decoding, cropping and tokenising happen there; encoding to latents
    happens in the main process, batched, through the codec and the latent cache.
    """

    def __init__(self, records, tokenizer, cfg: Config, rank: int = 0, world: int = 1, seed: int | None = None):
        from .sources import ImageTransform, SkipStats

        self.records, self.tokenizer, self.data = records, tokenizer, cfg.data
        self.seed = cfg.train.seed if seed is None else seed
        self.rank, self.world = rank, world
        self.per_batch = examples_per_batch(cfg)
        self.transform = ImageTransform(cfg.data.resolution, crop=cfg.data.crop)
        self.skips = SkipStats()

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

    def prepare(self, p: int, record: Record | None = None) -> Prepared | None:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + p)
        if record is None:
            record = self.records[self.record_index(p)]
        if record is None:  # a source that marks bad records with None has counted them
            return None
        pixels = self.transform(record.image, generator=g)
        if pixels is None:
            self.skips.add("too_small", record.key)
            return None
        caption = record.captions[int(torch.randint(len(record.captions), (1,), generator=g))]
        ids = self.tokenizer.encode(caption)[: self.data.max_caption_tokens]
        caption_first = bool(torch.rand(1, generator=g) < self.data.caption_first)
        if caption_first and torch.rand(1, generator=g) < self.data.caption_dropout:
            ids = []
        return Prepared(p, record.key, pixels, ids, caption_first)

    def __getitem__(self, g: int) -> list[Prepared]:
        return [ex for p in self.positions(g) if (ex := self.prepare(p)) is not None]


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
    """Iterates training batches from batch index ``start``; ``next_index`` is what a checkpoint keeps."""

    def __init__(self, source: ExampleSource, encode, cfg: Config, specials: Specials, start: int = 0):
        self.source, self.encode, self.cfg, self.specials = source, encode, cfg, specials
        self.next_index = start
        workers = cfg.data.num_workers
        self.loader = torch.utils.data.DataLoader(
            source, batch_size=None, sampler=_Counter(start), num_workers=workers,
            collate_fn=lambda x: x, persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
        self._it = iter(self.loader)

    def __next__(self) -> Batch:
        prepared = next(self._it)
        self.next_index += 1
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
