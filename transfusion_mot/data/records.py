"""The configured data as records: a source per split (train / val), iteration that skips bad records,
and the held-out (latents, caption ids) pairs that validation scores."""
from __future__ import annotations

import torch

from ..config import Config, DataConfig
from .segments import Record
from .sources import SkipStats


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


def _records_name(records) -> str:
    return getattr(records, "name", type(records).__name__)


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
