"""Data sources: the registry that ``data.source`` names, the real captioned-image sources and the accounting
of skipped records (DESIGN §4); the image transform lives in data/transform.py.

``SOURCES`` maps each ``data.source`` name to a ``SourceSpec``: how to build its records per split and
the checks of its own options (``config_checks.validate`` runs them). Adding a source is one
``register_source`` call; nothing else branches on the name.

The image folder, COCO and Hugging Face sources are map-style datasets of ``Record`` (raw PIL image +
captions), so data order is a pure function of the index and a run resumes exactly; webdataset shards are
streamed (data/streaming.py). Problems found while indexing (a metadata line naming a missing file, a
malformed line, a line that is not UTF-8) are counted in ``source.skips``; problems found while reading
one record (unreadable image, empty caption) raise ``BadRecord``, which the pipeline counts and skips.
A run never dies on one bad record; a source with no usable record at all stops with ``NoUsableData``.
"""
from __future__ import annotations

import csv
import io
import json
import difflib
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image as PILImage

from ..config import ConfigError, DataConfig
from .segments import Record
from .transform import ImageTransform, bucket_sizes  # ImageTransform: also importable from here, as before

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
IMAGEFOLDER_FILES = ("metadata.jsonl", "captions.csv", "captions.txt")
SOURCE_KINDS = ("imagefolder", "coco", "webdataset", "hf")


class NoUsableData(ValueError):
    """A data source has nothing left that training can use; the message says what was skipped and why."""


class BadRecord(Exception):
    """One record cannot be used; ``reason`` is the SkipStats bucket ("unreadable", "empty_caption")."""

    def __init__(self, key: str, reason: str, detail: str = ""):
        super().__init__(f"{key}: {reason}" + (f" ({detail})" if detail else ""))
        self.key, self.reason, self.detail = key, reason, detail


@dataclass
class SkipStats:
    """Counts of skipped records by reason, with a few example keys so a report points at real files."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 3

    def add(self, reason: str, key: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        keys = self.examples.setdefault(reason, [])
        if len(keys) < self.max_examples:
            keys.append(str(key))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: "SkipStats") -> "SkipStats":
        """Fold another worker's or epoch's counts into this one (in place; returns self)."""
        for reason, n in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + n
            keys = self.examples.setdefault(reason, [])
            keys.extend(k for k in other.examples.get(reason, []) if len(keys) < self.max_examples and k not in keys)
        return self

    def to_dict(self) -> dict[str, Any]:
        examples = {reason: list(keys) for reason, keys in self.examples.items()}
        return {"total": self.total, "counts": dict(self.counts), "examples": examples}

    def report(self) -> str:
        """One line for the end-of-epoch log, e.g. ``skipped 2 records: 1 unreadable (e.g. bad.jpg), ...``."""
        if not self.total:
            return "skipped 0 records"
        parts = [f"{n} {reason} (e.g. {', '.join(self.examples.get(reason, []))})" for reason, n in self.counts.items()]
        return f"skipped {self.total} record{'s' if self.total != 1 else ''}: " + ", ".join(parts)


def open_image(data: bytes | str | Path, key: str) -> PILImage.Image:
    """Decode fully now (not lazily), so a truncated or corrupt file raises here as ``BadRecord``."""
    try:
        with PILImage.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError, PILImage.DecompressionBombError) as e:
        raise BadRecord(key, "unreadable", str(e)) from e


def clean_captions(captions: Any, key: str) -> list[str]:
    """Strip captions and drop empty ones; no caption left is a ``BadRecord``."""
    if isinstance(captions, str):
        captions = [captions]
    kept = [c.strip() for c in captions or [] if isinstance(c, str) and c.strip()]
    if not kept:
        raise BadRecord(key, "empty_caption")
    return kept


def _require_path(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not str(path) or not p.exists():
        raise FileNotFoundError(f"{what} not found: {str(path)!r}")
    return p.resolve()


class ImageFolderSource(torch.utils.data.Dataset):
    """A folder of images with ``metadata.jsonl``, ``captions.csv`` or the Flickr8k ``captions.txt``.

    Several lines / rows for one image become several captions of one record.
    """

    def __init__(self, root: str | Path, captions_file: str | Path | None = None, text_column: str = "text"):
        self.root = _require_path(root, "image folder")
        self.text_column = text_column
        self.skips = SkipStats()
        self.captions_path = self._find_captions(captions_file)
        self.name = f"imagefolder:{self.captions_path}"
        if self.captions_path.suffix == ".jsonl":
            entries = self._read_jsonl(self.captions_path)
        else:
            entries = self._read_csv(self.captions_path)
        self.items: list[tuple[str, list[str]]] = []
        for file_name, captions in entries.items():
            if (self.root / file_name).is_file():
                self.items.append((file_name, captions))
            else:
                self.skips.add("missing_file", file_name)

    def _find_captions(self, captions_file: str | Path | None) -> Path:
        if captions_file:
            p = Path(captions_file)
            return _require_path(p if p.is_absolute() else self.root / p, "captions file")
        for name in IMAGEFOLDER_FILES:
            if (self.root / name).is_file():
                return self.root / name
        raise FileNotFoundError(f"no captions file in image folder {self.root}: expected one of "
                                f"{', '.join(IMAGEFOLDER_FILES)} (or pass captions=<file>)")

    def _text_keys(self) -> list[str]:
        return list(dict.fromkeys([self.text_column, "text", "caption"]))

    def _read_jsonl(self, path: Path) -> dict[str, list[str]]:
        entries: dict[str, list[str]] = defaultdict(list)
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    self.skips.add("bad_encoding", f"{path.name}:{lineno}")
                    continue
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    file_name = row["file_name"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    self.skips.add("malformed_line", f"{path.name}:{lineno}")
                    continue
                text = next((row[k] for k in self._text_keys() if k in row), "")
                entries[file_name].extend([text] if isinstance(text, str) else list(text or []))
        return entries

    def _read_csv(self, path: Path) -> dict[str, list[str]]:
        # surrogateescape: a byte that is not UTF-8 stays visible as a surrogate, so only its row is dropped
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            image_col = next((c for c in ("file_name", "image") if c in columns), None)
            text_col = next((c for c in self._text_keys() if c in columns), None)
            if image_col is None or text_col is None:
                raise ValueError(f"{path}: needs an image column (file_name or image) and a caption column "
                                 f"({' or '.join(self._text_keys())}); found columns {columns}")
            entries: dict[str, list[str]] = defaultdict(list)
            for row in reader:
                if _not_utf8(row[image_col]) or _not_utf8(row[text_col]):
                    self.skips.add("bad_encoding", f"{path.name}:{reader.line_num}")
                    continue
                entries[row[image_col]].append(row[text_col] or "")
        return entries

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Record:
        file_name, captions = self.items[i]
        captions = clean_captions(captions, file_name)
        return Record(open_image(self.root / file_name, file_name), captions, key=file_name)


class CocoSource(torch.utils.data.Dataset):
    """COCO captions json (``images`` + ``annotations``); images in ``image_dir`` (default: beside it)."""

    def __init__(self, json_path: str | Path, image_dir: str | Path | None = None):
        self.json_path = _require_path(json_path, "COCO captions json")
        self.image_dir = _require_path(image_dir, "COCO image folder") if image_dir else self.json_path.parent
        self.name = f"coco:{self.json_path}:{self.image_dir}"
        self.skips = SkipStats()
        with open(self.json_path, encoding="utf-8", errors="surrogateescape") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.json_path}: not valid JSON ({e})") from e
        missing = [k for k in ("images", "annotations") if not isinstance(data, dict) or k not in data]
        if missing:
            raise ValueError(f"{self.json_path}: not a COCO captions json, missing key(s) {missing}")
        captions: dict[int, list[str]] = defaultdict(list)
        for ann in data["annotations"]:
            caption = ann.get("caption", "")
            if _not_utf8(caption):  # one bad byte costs its caption, not the data set
                self.skips.add("bad_encoding", f"{self.json_path.name}: annotation {ann.get('id')}")
                continue
            captions[ann["image_id"]].append(caption)
        self.items: list[tuple[str, int, list[str]]] = []
        for img in data["images"]:
            if (self.image_dir / img["file_name"]).is_file():
                self.items.append((img["file_name"], img["id"], captions.get(img["id"], [])))
            else:
                self.skips.add("missing_file", img["file_name"])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Record:
        file_name, image_id, captions = self.items[i]
        captions = clean_captions(captions, file_name)
        return Record(open_image(self.image_dir / file_name, file_name), captions, key=file_name,
                      meta={"image_id": image_id})


class HFSource(torch.utils.data.Dataset):
    """Any Hugging Face ``datasets`` dataset with an image column and a text column.

    A local folder is read with ``load_from_disk``; anything else goes to ``load_dataset`` (offline
    unless the user allows the hub). Images are decoded here, not by ``datasets``, so a corrupt image
    becomes a counted ``BadRecord`` instead of an exception deep inside the library.
    """

    def __init__(self, path_or_name: str | Path, split: str = "train", image_column: str = "image",
                 text_column: str = "text"):
        from ..extras import require

        datasets = require("datasets", "data")

        self.split, self.image_column, self.text_column = split, image_column, text_column
        self.skips = SkipStats()
        local = Path(path_or_name).expanduser()
        if local.exists():
            ds = datasets.load_from_disk(str(local))
            ident = str(local.resolve())
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(f"{local}: no split {split!r}; available splits {list(ds)}")
                ds = ds[split]
        else:
            try:
                ds = datasets.load_dataset(str(path_or_name), split=split)
            except Exception as e:  # offline, unknown name, no such split: all mean "cannot use this"
                raise FileNotFoundError(f"Hugging Face dataset {str(path_or_name)!r} is not a local folder and could "
                                        f"not be loaded with load_dataset (split {split!r}): {e}") from e
            ident = str(path_or_name)
        for col, what in ((image_column, "image_column"), (text_column, "text_column")):
            if col not in ds.column_names:
                raise ValueError(f"{ident}: {what} {col!r} not in the dataset; available columns {ds.column_names}")
        if isinstance(ds.features[image_column], datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        self.dataset = ds
        self.name = f"hf:{ident}:{split}"

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Record:
        row = self.dataset[i]
        key = f"{self.split}/{i}"
        captions = clean_captions(row[self.text_column], key)
        value = row[self.image_column]
        if isinstance(value, PILImage.Image):
            image = value.convert("RGB")
        elif isinstance(value, dict) and (value.get("bytes") or value.get("path")):
            image = open_image(value.get("bytes") or value["path"], key)
        elif isinstance(value, str):
            image = open_image(value, key)
        else:
            raise BadRecord(key, "unreadable", f"no image in column {self.image_column!r}")
        return Record(image, captions, key=key)


_SURROGATE = re.compile("[\udc80-\udcff]")


def _not_utf8(text) -> bool:
    """True for text read with errors="surrogateescape" that held bytes which are not UTF-8."""
    return isinstance(text, str) and _SURROGATE.search(text) is not None


def _coco_json(path: Path, captions: str) -> tuple[Path, Path | None]:
    """(json, image_dir) for ``coco``: path is the json itself, or the image folder with captions=json."""
    if path.is_file():
        return path, None
    if captions:
        c = Path(captions)
        return _require_path(c if c.is_absolute() or c.exists() else path / c, "COCO captions json"), path
    found = sorted(path.glob("captions_*.json"))
    if len(found) != 1:
        raise FileNotFoundError(f"{path}: expected exactly one captions_*.json (found {[f.name for f in found]}); "
                                "pass data.captions=<json>")
    return found[0], path


def build_source(kind: str, path: str | Path, captions: str = "", image_column: str = "image",
                 text_column: str = "text", resolution: int = 64) -> torch.utils.data.Dataset:
    """The configured real source. ``resolution`` is accepted for symmetry with shapes; sources return
    raw images and ``ImageTransform`` resizes them."""
    if kind not in SOURCE_KINDS:
        raise ValueError(f"unknown data source {kind!r}; choose one of {', '.join(SOURCE_KINDS)} (or shapes)")
    if kind == "webdataset":
        from .streaming import ShardSource, expand_shards

        return ShardSource(expand_shards(path))
    if kind == "hf":
        source = HFSource(path, image_column=image_column, text_column=text_column)
    elif kind == "imagefolder":
        source = ImageFolderSource(_require_path(path, f"{kind} data path"), captions_file=captions or None,
                                   text_column=text_column)
    else:
        source = CocoSource(*_coco_json(_require_path(path, f"{kind} data path"), captions))
    if len(source) == 0:
        raise NoUsableData(f"{source.name}: no usable records ({source.skips.report()})")
    return source


def read_all(source, transform: ImageTransform, limit: int | None = None) -> tuple[list[Record], SkipStats]:
    """Every usable record with ``image`` replaced by its (3, H, W) tensor, and what was skipped and why.

    The stats include the source's own indexing skips, so one report covers the whole data set.
    """
    skips = SkipStats().merge(getattr(source, "skips", SkipStats()))
    out: list[Record] = []
    if hasattr(source, "records"):  # streamed shards: in order, no index
        records = (rec for rec, _ in zip(source.records(skips), range(limit if limit is not None else 2 ** 62)))
    else:
        records = _map_records(source, range(len(source) if limit is None else min(limit, len(source))), skips)
    for record in records:
        pixels = transform(record.image)
        if pixels is None:
            skips.add("too_small", record.key)
            continue
        out.append(replace(record, image=pixels))
    return out, skips


def _map_records(source, indices, skips: SkipStats):
    for i in indices:
        try:
            yield source[i]
        except BadRecord as bad:
            skips.add(bad.reason, bad.key)


# --------------------------------------------------------------------------------------------------
# The registry: data.source name -> how to build it per split, and the checks of its options
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceSpec:
    """What ``data.source=<name>`` means. ``build(data, split)`` gives the records of "train" or "val"
    (a map-style dataset of ``Record`` or a ``ShardSource``); ``check(data)`` raises ``ConfigError``
    naming a bad option of this source, at config time, before any work."""

    build: Callable[[DataConfig, str], Any]
    check: Callable[[DataConfig], None] | None = None
    encoded: bool = False  # its records hold the codec's latents, not images (``encode`` output)
    prompt_following: bool = False  # captions in the shapes grammar: metrics/shapes_checker scores samples
    # most positions a record's plug-in segments (``Record.extras``) take: their vectors + BOI / EOI per span;
    # the packing layout (data/batches.py layout()) makes room for them in every document
    extra_positions: int = 0


SOURCES: dict[str, SourceSpec] = {}


def register_source(name: str, spec: SourceSpec) -> None:
    """Make ``data.source=name`` build with ``spec`` (a later registration of a name replaces it)."""
    SOURCES[name] = spec


def source_spec(name: str) -> SourceSpec:
    if name not in SOURCES:
        close = difflib.get_close_matches(name, list(SOURCES), n=1)
        raise ConfigError(f"data.source={name!r} is not one of {tuple(SOURCES)}"
                          + (f"; did you mean {close[0]!r}?" if close else ""))
    return SOURCES[name]


def _shapes(d: DataConfig, split: str):
    """The generated shapes: disjoint seed ranges per split (data/shapes.py), square images at
    ``data.resolution`` (their captions name positions in the square, so ``data.buckets`` is refused)."""
    from .shapes import ShapesDataset

    size = d.shapes_train_size if split == "train" else d.shapes_val_size
    return ShapesDataset(split=split, size=size, resolution=d.resolution, max_shapes=d.shapes_max_shapes,
                         textured=d.shapes_textured)


def _check_shapes(d: DataConfig) -> None:
    for key, value in (("data.shapes_train_size", d.shapes_train_size), ("data.shapes_val_size", d.shapes_val_size)):
        if value < 1:
            raise ConfigError(f"{key}={value} must be >= 1")
    if not 1 <= d.shapes_max_shapes <= 4:
        raise ConfigError(f"data.shapes_max_shapes={d.shapes_max_shapes} must lie in 1..4")
    if d.buckets:
        raise ConfigError(f"data.buckets={[list(b) for b in bucket_sizes(d.buckets)]}: the shapes source renders "
                          f"square images at data.resolution (captions name positions in them); buckets are for "
                          f"real image sources")


def _map_style(d: DataConfig, split: str):
    """A real map-style source: ``data.val_path`` for "val", else its last ``data.val_fraction`` of records
    held out from training."""
    from .records import HeldOut

    def source(path):
        return build_source(d.source, path, captions=d.captions, image_column=d.image_column,
                            text_column=d.text_column, resolution=d.resolution)

    if split != "train" and d.val_path:
        return source(d.val_path)
    records = source(d.path)
    if d.val_path or d.val_fraction <= 0:
        return records
    n_val = max(1, int(len(records) * d.val_fraction))
    if n_val >= len(records):
        raise ValueError(f"data.val_fraction={d.val_fraction} leaves no training records in {d.path}")
    cut = len(records) - n_val
    return HeldOut(records, range(cut) if split == "train" else range(cut, len(records)), split)


def _shards(d: DataConfig, split: str):
    """Streamed shards (data/streaming.py), split by shard."""
    from .streaming import shard_records

    return shard_records(d, split)


register_source("shapes", SourceSpec(_shapes, _check_shapes, prompt_following=True))
register_source("imagefolder", SourceSpec(_map_style))
register_source("coco", SourceSpec(_map_style))
register_source("webdataset", SourceSpec(_shards))
register_source("hf", SourceSpec(_map_style))
register_source("latents", SourceSpec(_shards, encoded=True))
