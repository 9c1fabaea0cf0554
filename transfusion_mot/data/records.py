"""The configured data as records: a source per split (train / val), iteration that skips bad records,
and the held-out (latents, caption ids) pairs that validation scores."""
from __future__ import annotations

import torch

from ..config import Config, DataConfig
from .segments import Record
from .sources import SkipStats, source_spec


def build_records(cfg: DataConfig, split: str = "train"):
    """The configured source's records for ``split`` ("train" or "val"), built by its registered
    ``SourceSpec`` (data/sources.py): shapes has its own disjoint splits; a real source with
    ``data.val_path`` uses that for "val", without one its last ``data.val_fraction`` is held out."""
    return source_spec(cfg.source).build(cfg, split)


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
    """The first ``n`` good records as held-out ``Pair``s: centre crop (to each image's bucket with
    ``data.buckets``), first caption, clean latents (encoded shards already hold both)."""
    from ..metrics.validation import Pair
    from .transform import ImageTransform

    tf = ImageTransform(cfg.data.resolution, crop="center", buckets=cfg.data.buckets)
    latent_shards = getattr(records, "latents", False)
    pixels, ids = [], []
    for rec in iter_records(records):
        if len(pixels) == n:
            break
        px = rec.image if latent_shards or rec.image is None else tf(rec.image)  # None: a record without image
        if px is None or not rec.captions:
            continue
        pixels.append(px)
        ids.append((rec.meta["ids"][0] if latent_shards else tokenizer.encode(rec.captions[0]))
                   [: cfg.data.max_caption_tokens])
    if not pixels:
        raise ValueError(f"no usable held-out records in {_records_name(records)}")
    if latent_shards:
        return [Pair(lat, x) for lat, x in zip(pixels, ids)]
    from .batches import encode_by_shape

    device = next(codec.parameters()).device

    def run(keys, px):
        return codec.encode(px.to(device)).float().cpu()

    latents = []
    for i in range(0, len(pixels), batch_size):  # one encoder call per image shape per chunk
        chunk = pixels[i:i + batch_size]
        latents += encode_by_shape(run, [""] * len(chunk), chunk)
    return [Pair(lat, x) for lat, x in zip(latents, ids)]
