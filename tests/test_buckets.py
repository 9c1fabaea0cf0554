"""Aspect-ratio buckets (``data.buckets``, issue 21 item 2): each real image is resized to cover the bucket
nearest its aspect ratio and cropped to it, so landscape photos stay landscape; latents are encoded, cached and
packed at each image's own shape, and a debug run trains on batches that mix shapes."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import REPO, debug_overrides
from helpers import train_recording
from PIL import Image as PILImage

from transfusion_mot import rng
from transfusion_mot.components.resume import config_changes
from transfusion_mot.config import ConfigError, load_config
from transfusion_mot.data.sources import SkipStats, build_source
from transfusion_mot.data.transform import ImageTransform, nearest_bucket

DEBUG = str(REPO / "configs" / "debug.yaml")
BUCKETS = "data.buckets=[[32,32],[32,48],[48,32]]"  # square, landscape 3:2, portrait 2:3 (h, w); TAEF2: /8, p=2


def _picture(w: int, h: int, seed: int = 0) -> PILImage.Image:
    return PILImage.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_each_image_goes_to_the_bucket_of_its_aspect_ratio():
    buckets = ((32, 32), (32, 64), (64, 32))
    assert nearest_bucket(200, 100, buckets) == (32, 64)  # 2:1 landscape -> the 2:1 bucket
    assert nearest_bucket(100, 200, buckets) == (64, 32)  # portrait
    assert nearest_bucket(150, 150, buckets) == (32, 32)  # square -> square
    assert nearest_bucket(120, 100, buckets) == (32, 32)  # 1.2:1 is nearer 1:1 than 2:1
    assert nearest_bucket(170, 100, buckets) == (32, 64)  # 1.7:1 is nearer 2:1 (in log ratio)
    tf = ImageTransform(32, buckets=[[32, 32], "32x64", [64, 32]])  # [h, w] or "HxW"
    assert tf(_picture(200, 100)).shape == (3, 32, 64)
    assert tf(_picture(100, 200)).shape == (3, 64, 32)
    assert tf(_picture(90, 90)).shape == (3, 32, 32)
    assert tf(_picture(40, 20)).shape == (3, 32, 64)  # 1.6x upsampling: kept
    assert tf(_picture(30, 15)) is None  # would need 2x upsampling to its 32 x 64 bucket: skipped as too small


def test_no_buckets_is_the_square_crop_of_before():
    """Without buckets the transform is today's: short side to R, square crop (a landscape photo loses its sides)."""
    image = _picture(120, 60, seed=3)
    square = ImageTransform(32)(image)
    assert square.shape == (3, 32, 32)
    ref = image.resize((64, 32), PILImage.Resampling.BILINEAR).crop((16, 0, 48, 32))
    assert torch.equal(square, torch.from_numpy(np.asarray(ref, dtype=np.float32).transpose(2, 0, 1) / 255.0))
    assert torch.equal(ImageTransform(32, buckets=[[32, 32]])(image), square)  # one square bucket: the same


def test_random_bucket_crop_is_a_function_of_the_example_seed():
    tf = ImageTransform(32, crop="random", buckets=[[32, 32], [32, 48]])
    image = _picture(300, 190, seed=1)  # 1.58:1 -> the 32 x 48 bucket, resized to 51 x 32: 4 crop offsets

    def crop(p):
        return tf(image, generator=rng.torch_generator(0, p, purpose="crop"))

    assert crop(5).shape == (3, 32, 48)
    assert torch.equal(crop(5), crop(5))  # the same example, the same crop
    assert any(not torch.equal(crop(5), crop(p)) for p in range(6, 12))  # other examples, other crops


def test_bad_buckets_stop_at_config_time(tmp_path: Path):
    base = ["data.source=imagefolder", f"data.path={tmp_path}", "codec.kind=taef2", "model.latent_channels=32"]
    with pytest.raises(ConfigError, match=r"bucket \[32, 40\] is not a multiple of 16 px .*downsampling 8 x "
                                          r"model.patch_size=2"):
        load_config(DEBUG, [*base, "data.buckets=[[32,32],[32,40]]"])
    with pytest.raises(ConfigError, match=r"data.buckets: bucket '32by48' is not a \(height, width\) pair"):
        load_config(DEBUG, [*base, "data.buckets=['32by48']"])
    with pytest.raises(ConfigError, match=r"bucket \[0, 32\] is not a \(height, width\) pair of positive ints"):
        load_config(DEBUG, [*base, "data.buckets=[[0,32]]"])
    with pytest.raises(ConfigError, match="the shapes source renders square images"):
        load_config(DEBUG, ["data.buckets=[[32,32]]"])
    # the longest document is sized by the largest bucket: 128 x 256 px = 16 x 32 latents = 128 patches
    with pytest.raises(ConfigError, match=r"data.seq_len=128 cannot hold one image of 128 patches \(the largest "
                                          r"of data.buckets\)"):
        load_config(DEBUG, [*base, "data.buckets=[[32,32],[128,256]]"])
    cfg = load_config(DEBUG, [*base, "data.buckets=[[32,32],[64,96]]"])  # 4 x 6 = 24 patches: fits
    from transfusion_mot.data.batches import layout

    assert layout(cfg) == (2 + 60 + 24 + 2, 1)


def _flickr_folder(assets: Path, out: Path, n: int = 12) -> Path:
    """``n`` Flickr8k photos, half landscape and half portrait (beyond 5:4, so nearer 3:2 than 1:1), as an image folder with one caption each."""
    flickr = build_source("imagefolder", assets / "images" / "flickr8k-1000")
    wide, tall = [], []
    for name, caps in flickr.items:
        with PILImage.open(flickr.root / name) as im:
            w, h = im.size
        (wide if w > 1.25 * h else tall if h > 1.25 * w else []).append((name, caps[0]))
        if len(wide) >= n // 2 and len(tall) >= n // 2:
            break
    out.mkdir(parents=True)
    rows = []
    for name, caption in [x for pair in zip(wide[: n // 2], tall[: n // 2]) for x in pair]:
        shutil.copy(flickr.root / name, out / name)
        rows.append(json.dumps({"file_name": name, "text": caption}) + "\n")
    (out / "metadata.jsonl").write_text("".join(rows))
    return out


def _real_overrides(assets: Path, data: Path, run: Path, *extra: str) -> list[str]:
    return debug_overrides(run, "data.source=imagefolder", f"data.path={data}", "codec.kind=taef2",
                           f"codec.path={assets / 'vae'}", "model.latent_channels=32", BUCKETS, *extra)


def test_encode_and_cache_keep_each_images_bucket(assets_dir: Path, tmp_path: Path, monkeypatch):
    from transfusion_mot.data.batches import ExampleSource, collate_batch
    from transfusion_mot.data.latent_cache import LatentCache
    from transfusion_mot.data.packing import Specials
    from transfusion_mot.data.pipeline import (
        build_records,
        prepare_codec,
        prepare_tokenizer,
    )

    monkeypatch.setenv("TRANSFUSION_MOT_CACHE", str(tmp_path / "cache"))
    data = _flickr_folder(assets_dir, tmp_path / "flickr")
    cfg = load_config(DEBUG, _real_overrides(assets_dir, data, tmp_path / "run", "data.val_fraction=0",
                                             "data.seq_len=256"))  # 3 documents per row: 8 fit the 4 rows
    records = build_records(cfg.data, "train")
    codec, enc = prepare_codec(cfg, tmp_path / "run", records=records)
    tok = prepare_tokenizer(cfg)
    source = ExampleSource(records, tok, cfg)
    prepared = [source.prepare(p, SkipStats()) for p in range(8)]
    want = []  # each image's bucket from its own aspect ratio, as latent (h, w) at the codec's /8
    for prep in prepared:
        with PILImage.open(data / prep.key) as im:
            h, w = nearest_bucket(*im.size, ((32, 32), (32, 48), (48, 32)))
        assert prep.pixels.shape == (3, h, w)
        want.append([32, h // 8, w // 8])
    assert {tuple(s) for s in want} == {(32, 4, 6), (32, 6, 4)}  # landscape and portrait photos both
    batch = collate_batch(prepared, enc, cfg, Specials.of(tok))
    assert batch.image_shape.tolist() == want  # packed at each image's own shape
    assert (enc.misses, enc.hits) == (8, 0)
    for prep, lat in zip(prepared, batch.latents()):  # = the codec's latent of that image alone
        torch.testing.assert_close(lat, codec.encode(prep.pixels[None]).float()[0], rtol=1e-4, atol=1e-4)
    again = collate_batch(prepared, enc, cfg, Specials.of(tok))  # second epoch: every latent from the cache
    assert (enc.misses, enc.hits) == (8, 8) and torch.equal(again.patches, batch.patches)
    assert again.image_shape.tolist() == want
    # another bucket list never reads these latents; no buckets keeps the key of before
    name = records.name
    same = LatentCache(tmp_path / "c", name, codec.name, 32, [(32, 32), (32, 48), (48, 32)])
    assert LatentCache(tmp_path / "c", name, codec.name, 32, [(32, 32), (32, 64)]).dir != same.dir
    assert LatentCache(tmp_path / "c", name, codec.name, 32).dir != same.dir
    assert LatentCache(tmp_path / "c", name, codec.name, 32, ()).dir == LatentCache(tmp_path / "c", name,
                                                                                    codec.name, 32).dir


def test_encoded_shards_keep_each_images_bucket(assets_dir: Path, tmp_path: Path):
    from transfusion_mot.data.encode import check_meta, encode, read_meta

    data = _flickr_folder(assets_dir, tmp_path / "flickr", n=6)
    cfg = load_config(DEBUG, _real_overrides(assets_dir, data, tmp_path / "run", "data.val_fraction=0"))
    out = encode(cfg, tmp_path / "latents", shard_size=6, report=lambda msg: None)
    meta = read_meta(out)
    assert meta["buckets"] == [[32, 32], [32, 48], [48, 32]] and meta["splits"]["train"]["samples"] == 6
    shapes = {}
    for s in wds.WebDataset(str(out / "train" / "000000.tar"), shardshuffle=False):
        key = json.loads(s["json"])["key"]
        shapes[key] = np.load(io.BytesIO(s["npy"])).shape
        with PILImage.open(data / key) as im:
            h, w = nearest_bucket(*im.size, ((32, 32), (32, 48), (48, 32)))
        assert shapes[key] == (32, h // 8, w // 8)
    assert set(shapes.values()) == {(32, 4, 6), (32, 6, 4)}
    # training reads them at their own shapes (the buckets must be the encoded ones, as the resolution)
    train_cfg = load_config(DEBUG, debug_overrides(tmp_path / "run2", "data.source=latents", f"data.path={out}",
                                                   "data.seq_len=256", BUCKETS))
    assert {tuple(s) for s in _first_batch(train_cfg, tmp_path / "run2").image_shape.tolist()} == \
        {(32, 4, 6), (32, 6, 4)}
    with pytest.raises(ValueError, match=r"data.buckets=\[\[32, 32\]\] but the latents .* were encoded with "
                                         r"buckets \[\[32, 32\], \[32, 48\], \[48, 32\]\]"):
        check_meta(meta, load_config(DEBUG, _real_overrides(assets_dir, data, tmp_path / "r", "data.buckets=[[32,32]]")),
                   str(out))


def _first_batch(cfg, run: Path):
    from transfusion_mot.data.packing import Specials
    from transfusion_mot.data.pipeline import (
        build_records,
        build_stream,
        prepare_codec,
        prepare_tokenizer,
    )

    records = build_records(cfg.data, "train")
    _, enc = prepare_codec(cfg, run, records=records)
    tok = prepare_tokenizer(cfg)
    return next(build_stream(records, tok, enc, cfg, Specials.of(tok), report=lambda msg: None))


def test_streamed_shards_crop_to_buckets(assets_dir: Path, tmp_path: Path):
    """webdataset shards go through the same transform: one packed batch holds landscape and portrait latents."""
    data = _flickr_folder(assets_dir, tmp_path / "flickr", n=8)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    (tmp_path / "shards").mkdir()
    for k in range(2):
        with wds.TarWriter(str(tmp_path / "shards" / f"{k:03d}.tar")) as sink:
            for i, row in enumerate(rows[k::2]):
                sink.write({"__key__": f"{k}{i:03d}", "jpg": (data / row["file_name"]).read_bytes(), "txt": row["text"]})
    pattern = f"{tmp_path / 'shards'}/{{000..001}}.tar"
    cfg = load_config(DEBUG, debug_overrides(tmp_path / "run", "data.source=webdataset", f"data.path={pattern}",
                                             f"data.val_path={pattern}", "data.stream_lanes=2", "codec.kind=taef2",
                                             f"codec.path={assets_dir / 'vae'}", "model.latent_channels=32",
                                             "data.seq_len=256", BUCKETS))
    batch = _first_batch(cfg, tmp_path / "run")
    assert len(batch.image_shape) == 12 and {tuple(s) for s in batch.image_shape.tolist()} == {(32, 4, 6), (32, 6, 4)}


def test_debug_run_trains_on_batches_of_mixed_image_shapes(assets_dir: Path, tmp_path: Path, monkeypatch):
    from transfusion_mot.data.pipeline import (
        build_records,
        encode_records,
        load_run_codec,
        prepare_tokenizer,
    )

    monkeypatch.setenv("TRANSFUSION_MOT_CACHE", str(tmp_path / "cache"))
    data = _flickr_folder(assets_dir, tmp_path / "flickr")
    cfg = load_config(DEBUG, _real_overrides(assets_dir, data, tmp_path / "run", "train.steps=3", "train.log_every=1",
                                             "train.save_every=0", "train.eval_every=2", "data.val_fraction=0.25"))
    run, steps = train_recording(cfg, monkeypatch)
    seen = [b for step in steps for b in step]
    shapes = [{tuple(s) for s in b.image_shape.tolist()} for b in seen]
    assert len(seen) == 3 and all(s <= {(32, 4, 4), (32, 4, 6), (32, 6, 4)} for s in shapes)
    assert any(len(s) >= 2 for s in shapes), shapes  # one packed batch, images of different shapes
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["loss_lm"], r["loss_flow"]) for r in rows if "loss_lm" in r]
    assert len(losses) == 3 and all(np.isfinite(v) for pair in losses for v in pair)
    # validation scores the held-out photos (landscape and portrait) at their own buckets too
    val = next(r for r in rows if "val_flow" in r)
    assert np.isfinite(val["val_flow"]) and np.isfinite(val["val_lm"])
    pairs = encode_records(build_records(cfg.data, "val"), cfg, prepare_tokenizer(cfg), load_run_codec(cfg, run), 3)
    assert {tuple(p.latent.shape) for p in pairs} == {(32, 4, 6), (32, 6, 4)}


def test_resuming_a_checkpoint_from_before_buckets_is_no_data_change():
    """A checkpoint's config written before ``data.buckets`` existed has no such key: its default is no change."""
    from transfusion_mot.config import Config

    now = Config().to_dict()
    saved = json.loads(json.dumps(now))
    del saved["data"]["buckets"]
    layout = {"world_size": 1, "batch_size": now["data"]["batch_size"]}
    assert config_changes(saved, now, layout, layout) == {"model": [], "data": [], "applied": []}
    now["data"]["buckets"] = ([32, 48],)
    assert config_changes(saved, now, layout, layout)["data"] == ["data.buckets: [] -> [[32, 48]]"]
