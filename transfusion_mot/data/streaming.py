"""Webdataset tar shards read as a resumable stream (the CC12M / img2dataset layout, and encoded latents).

Shards are opened and read by ``webdataset`` (local paths, brace patterns, ``pipe:`` and URLs), one sample
at a time: start-up lists the shards and nothing else, so its time and memory do not grow with the number
of samples. Map-style sources pick the record of position ``p`` from a permutation of all records; a
stream cannot, so shards follow this contract instead (tested in tests/test_streaming.py):

- The shards are read in ``L = min(data.stream_lanes, number of shards)`` lanes. In its epoch ``e``, lane
  ``l`` reads the shards ``perm_e[l::L]`` in that order, each from its first sample, where ``perm_e`` is a
  permutation of the shard list drawn from ``(seed, e)``; then it goes on with its epoch ``e + 1``.
- Global example position ``p`` is the next sample of lane ``p mod L``. Everything else about the example
  (caption choice, order, dropout, t, noise) depends on ``(seed, p)`` exactly as for map-style sources.
- Rank ``r`` of ``W`` takes positions ``P0 + r + W q`` (``q = 0, 1, ...``), where ``P0`` is the position
  the run (or resume) started at; so global batch ``b`` is positions ``[P0 + b G, P0 + (b + 1) G)`` with
  ``G = W E`` whatever ``W`` is, and W processes see the examples one process sees with W times the batch.
  Each rank reads only its own ``L / W`` lanes and each DataLoader worker ``L / (W K)`` of them.
- The resumable state is the global position and, per lane, (epoch, shard in the epoch, sample offset in
  the shard, samples consumed, byte offset of the last sample): a resume seeks into a local shard (a
  ``pipe:`` / URL shard skips ``offset`` samples without reading their data). Re-sharding rule: a run resumes with any number of processes W and workers K for which
  ``W K`` divides ``L``, at the next unseen position; with the same global batch the batches are identical.
  Anything else (another shard list, seed or lane count) is refused with the reason.
"""
from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import base_plus_ext

from .. import rng
from .segments import Record
from .sources import IMAGE_EXTS, BadRecord, NoUsableData, SkipStats, clean_captions, open_image  # noqa: F401

META = re.compile(r"(.*/)?__[^/]*__($|/)")  # webdataset's metadata files, not samples
REMOTE = ("pipe:", "http://", "https://", "s3://", "gs://", "ais://", "hf://", "sftp://", "scp://")


# --------------------------------------------------------------------------------------------------
# Shard lists
# --------------------------------------------------------------------------------------------------
def expand_shards(pattern: str | Path) -> list[str]:
    """A folder (its ``*.tar``), a glob, a brace pattern ``shard-{000..099}.tar`` (webdataset's expansion;
    ``::`` joins several), or ``pipe:`` / URL shards -> the shard list. Local shards must exist.

    Each folder is resolved and listed once (not one stat per shard), so listing 1,000 shards costs about
    what listing 10 does: start-up stays flat as the data grows.
    """
    text = str(pattern)
    if not text.startswith(REMOTE) and Path(text).expanduser().is_dir():
        folder = os.path.realpath(os.path.expanduser(text))
        shards = [os.path.join(folder, name) for name in sorted(os.listdir(folder)) if name.endswith(".tar")]
    else:
        shards, missing, listed = [], [], {}
        for expanded in wds.shardlists.expand_urls(text):
            if expanded.startswith(REMOTE):
                shards.append(expanded)
                continue
            parent, name = os.path.split(os.path.expanduser(expanded))
            if parent not in listed:
                real = os.path.realpath(parent or ".")
                listed[parent] = (real, set(os.listdir(real)) if os.path.isdir(real) else set())
            real, names = listed[parent]
            found = sorted(fnmatch.filter(names, name)) if any(c in name for c in "*?[") else [name]
            for f in found:
                (shards if f in names else missing).append(os.path.join(real, f))
        if missing:
            raise FileNotFoundError(f"webdataset shard(s) not found for {text!r}: {missing[:5]}")
    if not shards:
        raise FileNotFoundError(f"no webdataset shards (*.tar) match {text!r}")
    return shards


def split_shards(shards: list[str], val_fraction: float, what: str) -> tuple[list[str], list[str]]:
    """(train, val): the last ``max(1, val_fraction * n)`` shards are held out (shard-level split)."""
    if val_fraction <= 0:
        return shards, shards
    n_val = max(1, int(len(shards) * val_fraction))
    if n_val >= len(shards):
        raise ValueError(f"data.val_fraction={val_fraction} holds out whole shards, and {what} has only "
                         f"{len(shards)} shard(s): give data.val_path=<held-out shards> or more shards")
    return shards[:-n_val], shards[-n_val:]


def _name(shards: list[str]) -> str:
    short = shards[0] + (f"..{Path(shards[-1]).name}" if len(shards) > 1 else "")
    digest = hashlib.sha1("\n".join(shards).encode()).hexdigest()[:10]
    return f"{short}#{len(shards)}:{digest}"


# --------------------------------------------------------------------------------------------------
# Reading one shard
# --------------------------------------------------------------------------------------------------
def _members(fileobj, base: int, skip: int) -> Iterator[tuple[str, str, bytes, int]]:
    """(key, ext, data, byte offset of its header) of each file in a tar stream, webdataset's way (key =
    path up to the first dot of the name, ``__meta__`` files ignored); the first ``skip`` samples' data
    is never read. The offsets let a local shard resume with a seek instead of re-reading headers."""
    tar = tarfile.open(fileobj=fileobj, mode="r|*")
    n, prefix = 0, None
    for info in tar:
        key, ext = base_plus_ext(info.name) if info.isreg() else (None, None)
        if key is None or META.match(info.name):
            continue
        if key != prefix:
            prefix, n = key, n + 1
        if n > skip:
            yield key, ext.lower(), tar.extractfile(info).read(), base + info.offset
        tar.members = []  # stream mode: keep nothing of earlier members


def read_shard(url: str, skip: int = 0, skips: SkipStats | None = None, byte: int = 0) -> Iterator[dict]:
    """Samples (``__key__``, ``__offset__`` and one ``ext -> bytes`` per file) of one shard after its first
    ``skip``; ``byte``: a local shard is entered there (a sample's ``__offset__``) by a seek.

    Shards are opened by webdataset (``gopen``: local paths, ``pipe:``, URLs). A damaged or unreachable
    shard ends early with one ``bad_shard`` count; the samples before the damage stay.
    """
    local = not url.startswith(REMOTE)
    try:
        stream = wds.gopen(url)
        try:
            if byte and local:
                stream.seek(byte)
            sample: dict | None = None
            for key, ext, data, offset in _members(stream, byte if local else 0, skip):
                if sample is None or key != sample["__key__"]:
                    if sample is not None:
                        yield sample
                    sample = {"__key__": key, "__offset__": offset}
                if ext in sample:
                    raise ValueError(f"duplicate file {key}.{ext}")
                sample[ext] = data
            if sample is not None:
                yield sample
        finally:
            stream.close()
    except (tarfile.TarError, OSError, ValueError, EOFError) as e:
        if skips is None:
            raise
        skips.add("bad_shard", f"{url} ({type(e).__name__}: {e})")


def _shard_stem(url: str) -> str:
    return Path(url.split("?")[0].rstrip("|").split()[-1]).name.removesuffix(".tar")


def sample_to_record(sample: dict, shard: str) -> Record:
    """An img2dataset sample (``jpg|png|...`` + ``txt`` or ``json`` with "caption") -> Record or BadRecord."""
    key = f"{shard}/{sample['__key__']}"
    meta: dict = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRecord(key, "unreadable", f"bad json: {e}") from e
        meta = meta if isinstance(meta, dict) else {}
    image_ext = next((ext for ext in IMAGE_EXTS if ext in sample), None)
    if image_ext is None:
        raise BadRecord(key, "no_image")
    text = sample["txt"].decode("utf-8", errors="replace") if "txt" in sample else meta.get("caption") or ""
    captions = clean_captions(text, key)
    return Record(open_image(sample[image_ext], key), captions, key=key, meta=meta)


def sample_to_latent_record(sample: dict, shard: str) -> Record:
    """A sample written by ``transfusion-mot encode`` -> Record whose image is the (C, h, w) latent and
    whose meta holds the token ids of each caption."""
    key = f"{shard}/{sample['__key__']}"
    try:
        latent = torch.from_numpy(np.load(io.BytesIO(sample["npy"])).astype(np.float32))
        meta = json.loads(sample["json"])
        captions, ids = meta["captions"], meta["ids"]
    except (KeyError, ValueError, TypeError, OSError) as e:
        raise BadRecord(key, "unreadable", f"not an encoded sample: {type(e).__name__}: {e}") from e
    return Record(latent, list(captions), key=meta.get("key", key), meta={"ids": ids})


class ShardSource:
    """A list of shards and how their samples become Records; no per-sample index is ever built."""

    def __init__(self, shards: list[str], latents: bool = False):
        self.shards = list(shards)
        self.latents = latents
        self.name = ("latents:" if latents else "webdataset:") + _name(self.shards)
        self.skips = SkipStats()

    def to_record(self, sample: dict, url: str) -> Record:
        convert = sample_to_latent_record if self.latents else sample_to_record
        return convert(sample, _shard_stem(url))

    def records(self, skips: SkipStats | None = None) -> Iterator[Record]:
        """Every usable record, shard after shard, in list order (held-out data, VAE images, encoding)."""
        skips = SkipStats() if skips is None else skips
        for url in self.shards:
            for sample in read_shard(url, skips=skips):
                try:
                    yield self.to_record(sample, url)
                except BadRecord as bad:
                    skips.add(bad.reason, bad.key)


def shard_records(data, split: str = "train") -> ShardSource:
    """``data.source`` webdataset (shards as given) or latents (a folder ``encode`` wrote, with train/ and
    val/ shards) -> the ShardSource of ``split``. Without ``data.val_path``, webdataset holds out its last
    shards (``data.val_fraction`` of them, at least one)."""
    latents = data.source == "latents"
    if latents:
        from .encode import read_meta

        meta = read_meta(data.path)
        root = Path(data.path).expanduser()
        if split != "train" and data.val_path:
            return ShardSource(expand_shards(data.val_path), latents=True)
        has_val = split != "train" and meta["splits"].get("val", {}).get("shards")
        return ShardSource(expand_shards(root / ("val" if has_val else "train")), latents=True)
    if split != "train" and data.val_path:
        return ShardSource(expand_shards(data.val_path))
    shards = expand_shards(data.path)
    if data.val_path:
        return ShardSource(shards)
    train, val = split_shards(shards, data.val_fraction, data.path)
    return ShardSource(train if split == "train" else val)


# --------------------------------------------------------------------------------------------------
# Lanes: the resumable, world-size-independent order
# --------------------------------------------------------------------------------------------------
@dataclass
class LaneState:
    epoch: int = 0
    shard: int = 0  # index into the lane's shard list of this epoch
    offset: int = 0  # samples of that shard already consumed
    consumed: int = 0  # samples this lane has given out in total
    byte: int = 0  # where the last consumed sample starts in a local shard: resume seeks there, skips it

    def as_list(self) -> list[int]:
        return [self.epoch, self.shard, self.offset, self.consumed, self.byte]


class LanePlan:
    """Which shards lane ``l`` reads in epoch ``e``: ``perm_e[l::L]``, perm_e drawn from (seed, e)."""

    def __init__(self, n_shards: int, lanes: int, seed: int):
        self.n_shards, self.lanes, self.seed = n_shards, min(lanes, n_shards), seed
        self._perm: tuple[int, np.ndarray] | None = None

    def shards(self, lane: int, epoch: int) -> list[int]:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, rng.stream(self.seed, epoch, purpose="shard_order").permutation(self.n_shards))
        return [int(i) for i in self._perm[1][lane::self.lanes]]

    def consumed_before(self, lane: int, position: int) -> int:
        """How many positions < ``position`` lane ``lane`` serves (what its state must say on resume)."""
        return max(0, (position - lane + self.lanes - 1) // self.lanes)


def lane_samples(source: ShardSource, plan: LanePlan, lane: int, state: LaneState,
                 pending: SkipStats) -> Iterator[tuple[dict, str, LaneState]]:
    """Lane ``lane``'s samples from ``state`` on, forever: (sample, shard url, state after it).

    A whole lane epoch without one sample (every shard empty, damaged or unreachable) would loop forever:
    it stops with ``NoUsableData`` instead. Damaged shards are counted into ``pending``.
    """
    st = LaneState(**vars(state))
    while True:
        shards = plan.shards(lane, st.epoch)
        found = st.offset > 0 or st.shard > 0
        while st.shard < len(shards):
            url = source.shards[shards[st.shard]]
            seek = st.byte if st.offset and not url.startswith(REMOTE) else 0
            for sample in read_shard(url, skip=1 if seek else st.offset, skips=pending, byte=seek):
                found = True
                st.offset, st.consumed, st.byte = st.offset + 1, st.consumed + 1, sample["__offset__"]
                yield sample, url, LaneState(**vars(st))
            st.shard, st.offset, st.byte = st.shard + 1, 0, 0
        if not found:
            names = [source.shards[i] for i in shards]
            raise NoUsableData(f"{source.name}: lane {lane} read all its shards of epoch {st.epoch} and found no "
                               f"sample ({pending.report()}); shards: {names[:3]}{' ...' if len(names) > 3 else ''}")
        st.epoch, st.shard = st.epoch + 1, 0


def check_layout(lanes: int, world: int, workers: int, n_shards: int) -> None:
    """Each process reads L / W lanes and each of its K workers (L / W) / K: both must divide."""
    k = max(workers, 1)
    if lanes % (world * k):
        raise ValueError(
            f"data.stream_lanes: the {n_shards} shards are read in {lanes} lanes (min(data.stream_lanes, shards)), "
            f"which must be a multiple of processes x loader workers = {world} x {k} = {world * k}; "
            f"set data.stream_lanes to a multiple of {world * k} (<= the number of shards) or change "
            f"data.num_workers")


# --------------------------------------------------------------------------------------------------
# Examples and batches from lanes
# --------------------------------------------------------------------------------------------------
@dataclass
class StreamItem:
    """One position's outcome, as a loader worker hands it over: the example (None when its record was
    skipped), the lane that served it and that lane's state after it, and what was skipped on the way."""

    position: int
    prepared: object | None
    lane: int
    lane_state: list[int]
    skips: SkipStats


class _StoredIds:
    """Tokenizer stand-in for encoded shards: the ids ``encode`` stored with each caption of the record."""

    def __init__(self):
        self.table: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        return list(self.table[text])


def _as_is(latent: torch.Tensor, generator=None) -> torch.Tensor:
    return latent


class StreamExamples(torch.utils.data.IterableDataset):
    """This rank's examples in position order, ``P0 + r + W q``; worker ``w`` of ``K`` makes ``q = w mod K``,
    which the DataLoader's round-robin hands back in order. Each position becomes an example through the
    same ``ExampleSource.prepare`` as map-style data (so the same per-position coins)."""

    def __init__(self, source: ShardSource, tokenizer, cfg, rank: int = 0, world: int = 1,
                 state: dict | None = None, seed: int | None = None):
        from .batches import ExampleSource

        self.source, self.rank, self.world = source, rank, world
        self.examples = ExampleSource(source, tokenizer, cfg, rank, world, seed)
        if source.latents:  # encoded shards: the record's image is already the latent, its ids are stored
            self.examples.transform, self.examples.tokenizer = _as_is, _StoredIds()
        self.plan = LanePlan(len(source.shards), cfg.data.stream_lanes, self.examples.seed)
        check_layout(self.plan.lanes, world, cfg.data.num_workers, len(source.shards))
        self.start, self.lane_states = self._load(state or {})

    def _ident(self) -> dict:
        return {"source": self.source.name, "n_lanes": self.plan.lanes, "seed": self.plan.seed}

    def _load(self, state: dict) -> tuple[int, dict[int, LaneState]]:
        if not state:
            return 0, {lane: LaneState() for lane in range(self.plan.lanes)}
        if state.get("kind") != "shards":
            raise ValueError("the checkpoint's data position is not a shard stream's (it was saved for a map-style "
                             "source); resume with the data it was trained on")
        changed = {k: (state.get(k), v) for k, v in self._ident().items() if state.get(k) != v}
        if changed:
            raise ValueError("cannot resume the shard stream exactly: " + ", ".join(
                f"{k} was {old!r}, now {new!r}" for k, (old, new) in changed.items()))
        start = int(state["position"])
        lanes = {int(row[0]): LaneState(*map(int, row[1:])) for row in state["lanes"]}
        for lane in range(self.plan.lanes):
            need = self.plan.consumed_before(lane, start)
            if lane not in lanes or lanes[lane].consumed != need:
                got = lanes[lane].consumed if lane in lanes else None
                raise ValueError(f"checkpoint data state: lane {lane} consumed {got} samples, position {start} "
                                 f"needs {need}; the saved state is inconsistent")
        return start, lanes

    def lanes_of_rank(self) -> list[int]:
        base = (self.start + self.rank) % self.world
        return list(range(base, self.plan.lanes, self.world))

    def __iter__(self) -> Iterator[StreamItem]:
        info = torch.utils.data.get_worker_info()
        w, k = (info.id, info.num_workers) if info is not None else (0, 1)
        pending, readers = SkipStats(), {}
        q = w
        while True:
            p = self.start + self.rank + self.world * q
            lane = p % self.plan.lanes
            if lane not in readers:
                readers[lane] = lane_samples(self.source, self.plan, lane, self.lane_states[lane], pending)
            sample, url, st = next(readers[lane])
            skips = SkipStats().merge(pending)
            pending.counts.clear(), pending.examples.clear()
            prepared = None
            try:
                record = self.source.to_record(sample, url)
                if self.source.latents:
                    self.examples.tokenizer.table = dict(zip(record.captions, record.meta["ids"]))
                prepared = self.examples.prepare(p, skips, record)
            except BadRecord as bad:
                skips.add(bad.reason, bad.key)
            yield StreamItem(p, prepared, lane, st.as_list(), skips)
            q += k


class ShardBatchStream:
    """Training batches from a ``StreamExamples``: ``next_index`` counts this rank's batches, ``position`` is
    the global position of the next global batch, and ``state_dict()`` (gathered over ranks) is what a
    checkpoint keeps to resume exactly. A batch whose records were all skipped is skipped too (counted), so a
    resume never meets it again; a rank whose lanes all went a whole epoch without a usable example stops."""

    def __init__(self, examples: StreamExamples, encode, cfg, specials, start: int = 0, report=print,
                 gather=None):
        from .batches import examples_per_batch

        self.examples, self.encode, self.cfg, self.specials = examples, encode, cfg, specials
        self.report, self.gather = report, gather
        self.per_batch = examples_per_batch(cfg)
        self.next_index, self.position = start, examples.start
        self.global_batch = self.per_batch * examples.world
        self.mine = examples.lanes_of_rank()
        self.lanes = {lane: examples.lane_states[lane].as_list() for lane in self.mine}
        self.skips = SkipStats().merge(examples.source.skips)
        self.empty_batches = 0
        self.epoch = max((s[0] for s in self.lanes.values()), default=0)
        self._usable_epoch = {lane: s[0] for lane, s in self.lanes.items()}
        self._expect = examples.start + examples.rank
        workers = cfg.data.num_workers
        self.loader = torch.utils.data.DataLoader(
            examples, batch_size=None, num_workers=workers, collate_fn=lambda x: x, persistent_workers=workers > 0,
            prefetch_factor=max(2, 2 * self.per_batch // workers) if workers else None)
        self._it = iter(self.loader)

    def _take(self) -> StreamItem:
        item = next(self._it)
        if item.position != self._expect:  # the order contract; a mismatch would be a loader bug
            raise RuntimeError(f"shard stream out of order: got position {item.position}, expected {self._expect}")
        self._expect += self.examples.world
        self.skips.merge(item.skips)
        self.lanes[item.lane] = item.lane_state
        if item.lane_state[0] > self.epoch:
            self.epoch = item.lane_state[0]
            if self.skips.total:
                self.report(f"epoch {self.epoch - 1} of the shards: {self.skips.report()}")
        return item

    def __next__(self):
        from .batches import collate_batch

        while True:
            prepared = [item.prepared for item in (self._take() for _ in range(self.per_batch))
                        if item.prepared is not None]
            self.next_index += 1
            self.position += self.global_batch
            if prepared:
                self._usable_epoch = {lane: s[0] for lane, s in self.lanes.items()}
                return collate_batch(prepared, self.encode, self.cfg, self.specials)
            self.empty_batches += 1
            self.report(f"batch {self.next_index - 1}: all {self.per_batch} records skipped, going on "
                        f"({self.skips.report()})")
            if all(self.lanes[lane][0] >= self._usable_epoch[lane] + 2 for lane in self.mine):
                raise NoUsableData(f"{self.examples.source.name}: no usable record in a whole epoch of every lane "
                                   f"this process reads; {self.skips.report()}")

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        """The data position of every lane (all ranks' lanes when ``gather`` is given)."""
        own = [[lane, *self.lanes[lane]] for lane in self.mine]
        rows = self.gather(own) if self.gather is not None else own
        return {"kind": "shards", **self.examples._ident(), "position": self.position,
                "lanes": sorted(rows, key=lambda row: row[0])}
