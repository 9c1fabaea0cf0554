"""``transfusion-mot encode``: a source encoded once into webdataset shards of latents + token ids + captions,
so training at scale reads latents (``data.source=latents data.path=DIR``) with no JPEG decode and no VAE.

    accelerate launch -m transfusion_mot.data.encode --config X --out DIR [key=value ...]

Layout of ``DIR``::

    encode.json        what was encoded and how (source, codec config + name, resolution, latent shape,
                       tokenizer, data.buckets when set, per-split shard counts and skips); "complete" once
                       every shard is done
    vae/               the codec, when the config trains its own (so DIR is self-contained)
    train/000000.tar   samples: <key>.npy = (C, h, w) normalised latent (float16 unless --dtype float32; with
                       data.buckets each at its image's bucket),
                       <key>.json = {"key", "captions", "ids"} (ids: each caption's token ids, untruncated)
    train/000000.json  that shard's count and skips, written after the tar: the shard's "done" mark
    val/...            the held-out split, as training would have held it out

Units: each input shard of a webdataset source becomes one output shard; a map-style source is cut into
runs of ``--shard-size`` records in source order. Process ``r`` of ``W`` encodes units ``r, r + W, ...``;
a rerun skips units already done (resumable per shard). Centre crops only: a random crop changes every epoch.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import torch

from ..config import Config, load_config, replace
from .sources import SkipStats
from .transform import ImageTransform, bucket_sizes

META = "encode.json"
DTYPES = {"float16": np.float16, "float32": np.float32}


def read_meta(folder: str | Path) -> dict:
    """The ``encode.json`` of an encoded folder; a missing or incomplete one is a clear error."""
    path = Path(folder).expanduser() / META
    if not path.is_file():
        raise FileNotFoundError(f"data.source=latents: {path} not found; data.path must be a folder written by "
                                f"`transfusion-mot encode --config X --out DIR`")
    meta = json.loads(path.read_text())
    if not meta.get("complete"):
        raise ValueError(f"{path}: the encoding is not complete (a run was stopped?); rerun the same "
                         f"`transfusion-mot encode` command to finish the missing shards")
    return meta


def check_meta(meta: dict, cfg: Config, folder: str) -> None:
    """The training config must read the latents as they were made: same tokenizer, resolution and buckets
    (the buckets size the longest document, so they must be the encoded ones)."""
    buckets = [list(b) for b in bucket_sizes(cfg.data.buckets)]
    for key, value in (("tokenizer", cfg.data.tokenizer), ("resolution", cfg.data.resolution), ("buckets", buckets)):
        if meta.get(key, []) != value:
            raise ValueError(f"data.{key}={value!r} but the latents in {folder} were encoded with "
                             f"{key} {meta.get(key, [])!r}; set data.{key}={meta.get(key, [])!r} or encode again")


def latents_codec_config(cfg: Config, meta: dict | None = None):
    """The codec config of encoded shards: ``codec.*`` when the user set it, else the one encode.json names
    (what an exported model folder must carry to decode its samples)."""
    meta = read_meta(cfg.data.path) if meta is None else meta
    user_set = not (cfg.codec.kind == "trained" and not cfg.codec.path)
    return cfg.codec if user_set else dataclasses.replace(cfg.codec, **meta["codec"]["config"])


def codec_for_latents(cfg: Config):
    """(codec, its config): the codec that decodes encoded shards, the one encode.json names unless ``codec.*``
    is set, in which case it must be that same codec (same weights and normalisation)."""
    from .codec import load_codec
    from .run_codec import check_codec

    meta = read_meta(cfg.data.path)
    check_meta(meta, cfg, cfg.data.path)
    codec_cfg = latents_codec_config(cfg, meta)
    codec = load_codec(codec_cfg)
    if codec.name != meta["codec"]["name"]:
        raise ValueError(f"codec {codec.name!r} (codec.kind={codec_cfg.kind}, codec.path={codec_cfg.path!r}) is not "
                         f"the codec {meta['codec']['name']!r} that encoded {cfg.data.path}; leave codec.* unset "
                         f"to use that one")
    check_codec(codec, cfg)
    return codec, codec_cfg


def _units(records, shard_size: int) -> list:
    """Encoding units: one per input shard, or runs of ``shard_size`` map-style records."""
    from .streaming import ShardSource

    if isinstance(records, ShardSource):
        return [ShardSource([url]) for url in records.shards]
    return [range(i, min(i + shard_size, len(records))) for i in range(0, len(records), shard_size)]


def _unit_records(records, unit, skips: SkipStats):
    if hasattr(unit, "records"):
        yield from unit.records(skips)
        return
    from .sources import BadRecord

    for i in unit:
        try:
            yield records[i]
        except BadRecord as bad:
            skips.add(bad.reason, bad.key)


@torch.no_grad()
def encode_unit(records, unit, out: Path, codec, tokenizer, resolution: int, dtype: str,
                batch_size: int = 32, buckets=()) -> dict:
    """Encode one unit into ``out`` (.tar, then its .json): returns the .json's content. With ``buckets``
    each image is centre-cropped to its own bucket and stored at its own latent shape."""
    import webdataset as wds

    from .batches import encode_by_shape

    tf, skips, n = ImageTransform(resolution, crop="center", buckets=buckets), SkipStats(), 0
    tmp = out.with_name(out.name + ".tmp")
    device = next(codec.parameters()).device
    with wds.TarWriter(str(tmp)) as sink:
        batch: list = []

        def flush():
            latents = encode_by_shape(lambda keys, px: codec.encode(px.to(device)).float().cpu(),
                                      [rec.key for _, rec in batch], [px for px, _ in batch])
            for lat, (_, rec) in zip(latents, batch):
                ids = [list(tokenizer.encode(c)) for c in rec.captions]
                sink.write({"__key__": f"{n_done[0]:09d}", "npy": lat.numpy().astype(DTYPES[dtype]),
                            "json": {"key": rec.key, "captions": rec.captions, "ids": ids}})
                n_done[0] += 1
            batch.clear()

        n_done = [0]
        for rec in _unit_records(records, unit, skips):
            px = tf(rec.image)
            if px is None:
                skips.add("too_small", rec.key)
                continue
            batch.append((px, rec))
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
        n = n_done[0]
    os.replace(tmp, out)
    info = {"samples": n, "skips": skips.to_dict()}
    out.with_suffix(".json").write_text(json.dumps(info))
    return info


def encode(cfg: Config, out: str | Path, shard_size: int = 1000, dtype: str = "float16", report=print) -> Path:
    """Encode ``cfg``'s train and val data into ``out`` (see the module doc); every process calls this."""
    from accelerate import PartialState

    from .pipeline import prepare_tokenizer
    from .records import _records_name, build_records
    from .run_codec import prepare_codec
    from .sources import source_spec

    if source_spec(cfg.data.source).encoded:
        raise ValueError(f"data.source={cfg.data.source} is already encoded; encode reads an image source")
    if cfg.data.crop != "center":
        raise ValueError(f"data.crop={cfg.data.crop!r}: encode stores one centre crop per image; set data.crop=center")
    if shard_size < 1 or dtype not in DTYPES:
        raise ValueError(f"--shard-size {shard_size} must be >= 1 and --dtype one of {list(DTYPES)}")
    # cpu=True without CUDA: several CPU processes (accelerate launch) then form a gloo group, as in train.py
    state, out = PartialState(cpu=not torch.cuda.is_available()), Path(out).expanduser()
    cfg = replace(cfg, data={"cache_latents": False})
    splits = {"train": build_records(cfg.data, "train"), "val": build_records(cfg.data, "val")}
    if _records_name(splits["val"]) == _records_name(splits["train"]):
        del splits["val"]  # nothing held out (data.val_fraction=0): the trainer then validates on train
    codec, _ = prepare_codec(cfg, out, state, splits["train"])
    tokenizer = prepare_tokenizer(cfg)
    codec_cfg = dataclasses.asdict(cfg.codec)
    if cfg.codec.kind == "trained":
        codec_cfg["path"] = str((out / "vae").resolve())
    ident = {"source": {k: _records_name(v) for k, v in splits.items()}, "resolution": cfg.data.resolution,
             "tokenizer": cfg.data.tokenizer, "vocab_size": tokenizer.vocab_size, "dtype": dtype,
             "codec": {"name": codec.name, "config": codec_cfg},
             "latent_shape": [codec.latent_channels, *[cfg.data.resolution // codec.downsample] * 2]}
    if cfg.data.buckets:  # only when set: encodings made before buckets keep their identity
        ident["buckets"] = [list(b) for b in bucket_sizes(cfg.data.buckets)]
    ident = json.loads(json.dumps(ident))  # as it reads back (tuples become lists)
    meta_path = out / META
    if state.is_main_process:
        if meta_path.is_file():
            old = json.loads(meta_path.read_text())
            if {k: old.get(k) for k in ident} != ident:
                raise ValueError(f"{out} holds latents of another encoding ({meta_path}); choose another --out")
        else:
            out.mkdir(parents=True, exist_ok=True)
            meta_path.write_text(json.dumps({**ident, "complete": False}, indent=1))
    state.wait_for_everyone()
    for split, records in splits.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        units = _units(records, shard_size)
        for j in range(state.process_index, len(units), state.num_processes):
            target = out / split / f"{j:06d}.tar"
            if target.with_suffix(".json").is_file():
                continue  # done by an earlier run
            info = encode_unit(records, units[j], target, codec, tokenizer, cfg.data.resolution, dtype,
                               buckets=cfg.data.buckets)
            report(f"[{state.process_index}] {split} shard {j + 1}/{len(units)}: {info['samples']} samples")
    state.wait_for_everyone()
    if state.is_main_process:
        summary = {}
        for split, records in splits.items():
            infos = [json.loads((out / split / f"{j:06d}.json").read_text())
                     for j in range(len(_units(records, shard_size)))]
            skips = SkipStats().merge(getattr(records, "skips", None) or SkipStats())
            for info in infos:
                skips.merge(SkipStats(dict(info["skips"]["counts"]), dict(info["skips"]["examples"])))
            summary[split] = {"shards": len(infos), "samples": sum(i["samples"] for i in infos),
                              "skips": skips.to_dict()}
            report(f"{split}: {summary[split]['samples']} samples in {len(infos)} shards; {skips.report()}")
        meta_path.write_text(json.dumps({**ident, "splits": summary, "complete": True}, indent=1))
    state.wait_for_everyone()
    return out


def main(argv: list[str] | None = None) -> None:
    from ..cli import find_config

    p = argparse.ArgumentParser(prog="transfusion-mot encode", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None)
    p.add_argument("--out", required=True, help="folder for encode.json, train/ and val/ shards")
    p.add_argument("--shard-size", type=int, default=1000, help="records per shard for map-style sources")
    p.add_argument("--dtype", default="float16", choices=list(DTYPES))
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cfg = load_config(find_config(args.config) if args.config else None, args.overrides)
    encode(cfg, args.out, args.shard_size, args.dtype)
    print(f"encoded into {args.out}; train with data.source=latents data.path={args.out}")


if __name__ == "__main__":
    main()
