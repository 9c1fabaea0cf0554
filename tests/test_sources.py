"""Real data sources: each reads a fixture it builds itself, bad records are skipped and counted, crops
are deterministic, and the Flickr8k / COCO subsets in ../shared/assets load."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from transfusion_mot.data.sources import (BadRecord, CocoSource, HFSource, ImageFolderSource, ImageTransform,
                                          SkipStats, build_source, read_all)
from transfusion_mot.data.streaming import ShardSource, expand_shards


def noise_image(w: int, h: int, seed: int, mode: str = "RGB") -> PILImage.Image:
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return PILImage.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode)


def jpeg_bytes(img: PILImage.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def bad_folder(tmp_path: Path) -> Path:
    """4 good images, a truncated JPEG, an empty caption and an 8x8 image, described in metadata.jsonl."""
    rows = []
    for i in range(4):
        noise_image(40 + 8 * i, 36, seed=i).save(tmp_path / f"good{i}.jpg")
        rows.append({"file_name": f"good{i}.jpg", "text": f"picture number {i}"})
    (tmp_path / "corrupt.jpg").write_bytes(jpeg_bytes(noise_image(48, 48, 9))[:300])
    rows.append({"file_name": "corrupt.jpg", "text": "a broken file"})
    noise_image(48, 48, 10).save(tmp_path / "silent.png")
    rows.append({"file_name": "silent.png", "text": "   "})
    noise_image(8, 8, 11).save(tmp_path / "tiny.png")
    rows.append({"file_name": "tiny.png", "caption": "too small to use"})
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return tmp_path


def test_imagefolder_skips_exactly_the_three_bad_records(bad_folder: Path):
    source = ImageFolderSource(bad_folder)
    assert len(source) == 7 and source.skips.total == 0
    records, skips = read_all(source, ImageTransform(16))
    assert sorted(r.key for r in records) == [f"good{i}.jpg" for i in range(4)]
    assert skips.counts == {"unreadable": 1, "empty_caption": 1, "too_small": 1}
    assert skips.examples == {"unreadable": ["corrupt.jpg"], "empty_caption": ["silent.png"], "too_small": ["tiny.png"]}
    report = skips.report()
    assert report.startswith("skipped 3 records:") and "1 unreadable (e.g. corrupt.jpg)" in report
    for r in records:
        assert r.image.shape == (3, 16, 16) and r.image.dtype == torch.float32
        assert 0.0 <= r.image.min() and r.image.max() <= 1.0
        assert r.captions[0].startswith("picture number")
    with pytest.raises(BadRecord) as err:
        source[[k for k, _ in source.items].index("corrupt.jpg")]
    assert err.value.reason == "unreadable" and err.value.key == "corrupt.jpg"


def test_indexing_problems_are_counted_not_fatal(bad_folder: Path):
    with open(bad_folder / "metadata.jsonl", "a") as f:
        f.write('{"file_name": "gone.jpg", "text": "missing"}\n{not json\n{"text": "no file name"}\n')
    source = ImageFolderSource(bad_folder)
    assert len(source) == 7
    assert source.skips.counts == {"missing_file": 1, "malformed_line": 2}
    assert source.skips.examples["missing_file"] == ["gone.jpg"]
    _, skips = read_all(source, ImageTransform(16))
    assert skips.total == 6  # the indexing skips are part of the one end-of-epoch report


def test_captions_csv_groups_rows_into_captions(tmp_path: Path):
    for name in ("a.jpg", "b.jpg"):
        noise_image(32, 32, seed=len(name)).save(tmp_path / name)
    (tmp_path / "captions.csv").write_text('image,caption\na.jpg,"a cat, sleeping"\na.jpg,a cat\nb.jpg,a dog\n')
    source = ImageFolderSource(tmp_path)
    assert len(source) == 2
    assert source[0].captions == ["a cat, sleeping", "a cat"] and source[1].captions == ["a dog"]
    (tmp_path / "other.csv").write_text("file_name,text\nb.jpg,only b\n")
    chosen = build_source("imagefolder", tmp_path, captions="other.csv")
    assert len(chosen) == 1 and chosen[0].key == "b.jpg" and chosen[0].captions == ["only b"]
    (tmp_path / "bad.csv").write_text("path,words\nb.jpg,x\n")
    with pytest.raises(ValueError, match=r"bad\.csv.*\['path', 'words'\]"):
        ImageFolderSource(tmp_path, captions_file="bad.csv")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    """Two shards in the img2dataset layout: .jpg + .txt, .png + .json caption, and two bad samples."""
    d = tmp_path / "shards"
    d.mkdir()
    with tarfile.open(d / "shard-000.tar", "w") as tar:
        _add(tar, "000000000.jpg", jpeg_bytes(noise_image(40, 32, 1)))
        _add(tar, "000000000.txt", b"a red kite in the sky")
        png = io.BytesIO()
        noise_image(32, 48, 2).save(png, format="PNG")
        _add(tar, "000000001.png", png.getvalue())
        _add(tar, "000000001.json", json.dumps({"caption": "a tall painting", "width": 32}).encode())
    with tarfile.open(d / "shard-001.tar", "w") as tar:
        _add(tar, "000010000.jpg", jpeg_bytes(noise_image(36, 36, 3)))
        _add(tar, "000010000.json", json.dumps({"caption": ""}).encode())
        _add(tar, "000010001.json", json.dumps({"caption": "no image here"}).encode())
        _add(tar, "000010002.jpg", jpeg_bytes(noise_image(64, 40, 4)))
        _add(tar, "000010002.txt", "un café à Paris".encode())
    return d


def test_webdataset_shards_any_pattern(shards: Path):
    patterns = [shards, str(shards / "shard-*.tar"), str(shards / "shard-{000..001}.tar")]
    lists = [expand_shards(p) for p in patterns]
    assert lists[0] == lists[1] == lists[2] == [str(shards / "shard-000.tar"), str(shards / "shard-001.tar")]
    pipe = f"pipe:cat {shards}/shard-{{000..001}}.tar"  # webdataset opens pipe: (and URL) shards itself
    assert expand_shards(pipe) == [f"pipe:cat {shards}/shard-000.tar", f"pipe:cat {shards}/shard-001.tar"]
    for source in (build_source("webdataset", patterns[2]), ShardSource(expand_shards(pipe))):
        skips = SkipStats()
        records = list(source.records(skips))
        assert [r.key for r in records] == ["shard-000/000000000", "shard-000/000000001", "shard-001/000010002"]
        assert records[0].captions == ["a red kite in the sky"]
        assert records[1].captions == ["a tall painting"] and records[1].meta["width"] == 32
        assert records[2].captions == ["un café à Paris"]
        assert skips.counts == {"empty_caption": 1, "no_image": 1}
    records, skips = read_all(source, ImageTransform(24))
    assert len(records) == 3 and skips.counts == {"no_image": 1, "empty_caption": 1}
    with pytest.raises(FileNotFoundError, match="shard-002"):
        expand_shards(str(shards / "shard-{000..002}.tar"))


def test_coco_json(tmp_path: Path):
    noise_image(50, 40, 1).save(tmp_path / "000000000001.jpg")
    noise_image(40, 50, 2, mode="L").save(tmp_path / "000000000002.jpg")
    coco = {"images": [{"id": 1, "file_name": "000000000001.jpg"}, {"id": 2, "file_name": "000000000002.jpg"},
                       {"id": 3, "file_name": "000000000003.jpg"}],
            "annotations": [{"image_id": 2, "id": 10, "caption": "a grey thing"},
                            {"image_id": 1, "id": 11, "caption": "first"},
                            {"image_id": 1, "id": 12, "caption": "second"}]}
    (tmp_path / "captions_val.json").write_text(json.dumps(coco))
    source = CocoSource(tmp_path / "captions_val.json")
    assert len(source) == 2 and source.skips.counts == {"missing_file": 1}
    assert source[0].captions == ["first", "second"] and source[0].meta == {"image_id": 1}
    assert source[1].image.mode == "RGB"
    by_dir = build_source("coco", tmp_path)  # the folder with one captions_*.json in it
    assert by_dir.name == source.name and len(by_dir) == 2
    (tmp_path / "nope.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="annotations"):
        CocoSource(tmp_path / "nope.json")


def test_hf_dataset_from_disk(tmp_path: Path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"image": [noise_image(30, 30, i) for i in range(3)],
                                     "caption": ["one", "", "three"]}, features=features)
    ds.save_to_disk(str(tmp_path / "ds"))
    source = build_source("hf", str(tmp_path / "ds"), text_column="caption")
    assert len(source) == 3 and source[0].captions == ["one"] and source[2].image.size == (30, 30)
    records, skips = read_all(source, ImageTransform(16))
    assert [r.key for r in records] == ["train/0", "train/2"] and skips.counts == {"empty_caption": 1}
    with pytest.raises(ValueError, match=r"text_column 'text'.*\['image', 'caption'\]"):
        HFSource(tmp_path / "ds")


def test_transform_crops_and_size_rule():
    tf = ImageTransform(32, crop="random")
    big = noise_image(120, 80, 5)
    a = tf(big, generator=torch.Generator().manual_seed(3))
    b = tf(big, generator=torch.Generator().manual_seed(3))
    others = [tf(big, generator=torch.Generator().manual_seed(s)) for s in range(4, 8)]
    assert a.shape == (3, 32, 32) and torch.equal(a, b)
    assert any(not torch.equal(a, o) for o in others)
    # A red | green | blue strip: the centre crop sees only green.
    strip = np.zeros((30, 90, 3), dtype=np.uint8)
    strip[:, :30, 0], strip[:, 30:60, 1], strip[:, 60:, 2] = 255, 255, 255
    centre = ImageTransform(30)(PILImage.fromarray(strip))
    assert centre[1].min() > 0.95 and centre[0].max() < 0.05 and centre[2].max() < 0.05
    grey = ImageTransform(16)(noise_image(20, 20, 6, mode="L"))
    assert grey.shape == (3, 16, 16) and torch.equal(grey[0], grey[2])
    tiny = noise_image(8, 8, 7)
    assert all(ImageTransform(r)(tiny) is None for r in (16, 32, 64, 256))
    assert ImageTransform(16, min_side=1)(tiny).shape == (3, 16, 16)
    with pytest.raises(ValueError, match="crop"):
        ImageTransform(16, crop="middle")


def test_skipstats_merge_and_dict():
    a, b = SkipStats(), SkipStats()
    a.add("unreadable", "x.jpg")
    for i in range(5):
        b.add("too_small", f"t{i}.png")
    b.add("unreadable", "y.jpg")
    a.merge(b)
    assert a.total == 7 and a.counts == {"unreadable": 2, "too_small": 5}
    assert a.to_dict()["examples"] == {"unreadable": ["x.jpg", "y.jpg"], "too_small": ["t0.png", "t1.png", "t2.png"]}
    assert SkipStats().report() == "skipped 0 records"


def test_build_source_errors(tmp_path: Path):
    with pytest.raises(ValueError, match="imagefolder, coco, webdataset, hf"):
        build_source("parquet", tmp_path)
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        build_source("imagefolder", tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError, match=r"metadata\.jsonl, captions\.csv, captions\.txt"):
        build_source("imagefolder", tmp_path)
    with pytest.raises(FileNotFoundError, match="no webdataset shards"):
        build_source("webdataset", tmp_path)


def test_flickr8k_subset(assets_dir: Path):
    source = build_source("imagefolder", assets_dir / "images" / "flickr8k-1000")
    assert len(source) == 1000 and source.skips.total == 0
    assert all(len(caps) == 5 for _, caps in source.items)
    records, skips = read_all(source, ImageTransform(64), limit=24)
    assert len(records) == 24 and skips.total == 0
    assert all(r.image.shape == (3, 64, 64) for r in records)
    assert any("," in c for _, caps in source.items for c in caps)  # quoted commas survived the CSV reader


def test_coco_mini_subset(assets_dir: Path):
    coco = assets_dir / "images" / "coco-mini"
    source = build_source("coco", coco / "captions_val2017_subset.json")
    assert len(source) == 159 and source.skips.total == 0
    assert all(len(caps) == 5 for _, _, caps in source.items)
    i = [name for name, _, _ in source.items].index("000000431848.jpg")
    record = source[i]
    assert record.image.mode == "RGB" and record.meta["image_id"] == 431848
    pixels = ImageTransform(64)(record.image)
    assert pixels.shape == (3, 64, 64) and torch.equal(pixels[0], pixels[1])


class _Counted(torch.utils.data.Dataset):
    """The toy source of the registry test: ``data.path=counted/N`` names N records (an option it checks)."""

    def __init__(self, n: int, split: str):
        self.n, self.split, self.name = n, split, f"counted-{split}-{n}"

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        from transfusion_mot.data.segments import Record

        return Record(image=noise_image(40, 40, seed=i), captions=[f"{self.split} picture {i}"], key=f"c{i}")


def test_a_new_source_is_one_registration(monkeypatch):
    """Adding a data source = registering a ``SourceSpec``: config validation runs its own option check
    (and not the shapes source's), and records, training examples and held-out prompts come from it."""
    from conftest import REPO

    from transfusion_mot.config import ConfigError, load_config
    from transfusion_mot.data.batches import ExampleSource
    from transfusion_mot.data.pipeline import build_records, prepare_tokenizer
    from transfusion_mot.data.sources import SOURCES, SourceSpec
    from transfusion_mot.evaluate import held_out_prompts

    def check(d):
        n = d.path.removeprefix("counted/")
        if not n.isdigit() or int(n) < 1:
            raise ConfigError(f"data.path={d.path!r}: the counted source takes counted/N, N >= 1 records")

    build = lambda d, split: _Counted(int(d.path.removeprefix("counted/")), split)  # noqa: E731
    monkeypatch.setitem(SOURCES, "counted", SourceSpec(build, check))
    debug = str(REPO / "configs" / "debug.yaml")
    with pytest.raises(ConfigError, match="the counted source takes counted/N"):
        load_config(debug, ["data.source=counted", "data.path=counted/many"])
    with pytest.raises(ConfigError, match="data.shapes_max_shapes=9 must lie in 1..4"):  # shapes checks its own
        load_config(debug, ["data.shapes_max_shapes=9"])
    cfg = load_config(debug, ["data.source=counted", "data.path=counted/6", "data.shapes_max_shapes=9"])  # not counted's
    train = build_records(cfg.data, "train")
    assert isinstance(train, _Counted) and len(train) == 6
    prepared = ExampleSource(train, prepare_tokenizer(cfg), cfg).prepare(0, SkipStats())
    assert prepared.pixels.shape == (3, cfg.data.resolution, cfg.data.resolution)
    assert held_out_prompts(cfg, 2) == ["val picture 0", "val picture 1"]  # not the shapes grammar's
