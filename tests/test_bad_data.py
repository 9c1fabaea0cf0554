"""Bad data never crashes or hangs a run (issue 23 item 8): a source with no usable image stops VAE training
with a clear error instead of searching forever, a batch whose records are all bad is skipped (so a resume
does not meet it again), a COCO json whose files are all missing and a caption file with one byte that is
not UTF-8 are reported by name and count."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from PIL import Image as PILImage

from transfusion_mot.config import load_config
from transfusion_mot.data.packing import Specials
from transfusion_mot.data.pipeline import ExampleSource, build_records, build_stream, prepare_tokenizer
from transfusion_mot.data.run_codec import _vae_images
from transfusion_mot.data.segments import Record
from transfusion_mot.data.sources import BadRecord, ImageFolderSource, build_source

DEBUG = str(REPO / "configs" / "debug.yaml")


def noise(path: Path, size: int = 40, seed: int = 0) -> None:
    PILImage.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


class Records:
    """A map-style source whose records ``good`` are images and every other one is unreadable."""

    def __init__(self, n: int, good: set[int]):
        self.n, self.good, self.name, self.skips = n, good, f"fake-{n}-{sorted(good)}", None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Record:
        if i not in self.good:
            raise BadRecord(f"r{i}.jpg", "unreadable", "truncated")
        arr = np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)
        return Record(PILImage.fromarray(arr), [f"record {i}"], key=f"r{i}.jpg")


@pytest.fixture
def alarm():
    """Fail instead of hanging: the old VAE image loop searched forever for a usable image."""
    def timeout(*_):
        raise TimeoutError("no answer in 20 s: the loop searches forever")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_vae_training_on_no_usable_image_stops(alarm):
    from transfusion_mot.data.sources import NoUsableData

    with pytest.raises(NoUsableData, match=r"no usable image for VAE training in fake-12-\[\].*12 unreadable"):
        _vae_images(Records(12, set()), resolution=32)(0)
    images = _vae_images(Records(12, {5}), resolution=32, batch_size=4)  # one good image is enough
    assert images(0).shape == (4, 3, 32, 32)


def _stream(records, cfg):
    tok = prepare_tokenizer(cfg)

    def encode(keys, px):
        return px[:, :, ::4, ::4].repeat(1, 2, 1, 1)[:, :4]

    return build_stream(records, tok, encode, cfg, Specials.of(tok), report=lambda msg: None)


def test_a_batch_of_bad_records_is_skipped_not_fatal(alarm):
    cfg = load_config(DEBUG, [])
    records = Records(40, {3, 17, 29, 36})
    source = ExampleSource(records, prepare_tokenizer(cfg), cfg)
    empty = [g for g in range(3) if all(source.record_index(p) not in records.good for p in source.positions(g))]
    assert empty  # the setup has whole batches of bad records
    stream = _stream(records, cfg)
    batches = [next(stream) for _ in range(3)]
    assert all(b.n_images >= 1 for b in batches)
    assert stream.empty_batches >= 1 and stream.skips.counts["unreadable"] > 0
    # the data position moved past the empty batches: a checkpoint taken now never replays them
    assert stream.next_index > 3


def test_nothing_usable_left_is_a_clear_stop(alarm):
    from transfusion_mot.data.sources import NoUsableData

    cfg = load_config(DEBUG, [])
    with pytest.raises(NoUsableData, match=r"no usable record in \d+ positions.*unreadable"):
        next(_stream(Records(10, set()), cfg))


def test_coco_json_with_every_file_missing(tmp_path: Path):
    from transfusion_mot.data.sources import NoUsableData

    coco = {"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in range(3)],
            "annotations": [{"image_id": i, "id": 10 + i, "caption": "a thing"} for i in range(3)]}
    (tmp_path / "captions_val.json").write_text(json.dumps(coco))
    with pytest.raises(NoUsableData, match=r"captions_val\.json.*no usable records.*3 missing_file"):
        build_source("coco", tmp_path / "captions_val.json")
    cfg = load_config(DEBUG, ["data.source=coco", f"data.path={tmp_path}"])
    with pytest.raises(NoUsableData):  # the run stops before any work, not with ZeroDivisionError later
        build_records(cfg.data, "train")


def test_one_non_utf8_byte_costs_one_caption_line_named(tmp_path: Path):
    for i in range(3):
        noise(tmp_path / f"{i}.jpg", seed=i)
    (tmp_path / "captions.csv").write_bytes(b"image,caption\n0.jpg,a dog\n1.jpg,caf\xe9 au lait\n2.jpg,a cat\n")
    source = ImageFolderSource(tmp_path)
    assert [name for name, _ in source.items] == ["0.jpg", "2.jpg"]
    assert source.skips.counts == {"bad_encoding": 1} and source.skips.examples["bad_encoding"] == ["captions.csv:3"]
    rows = [b'{"file_name": "0.jpg", "text": "a dog"}', b'{"file_name": "1.jpg", "text": "caf\xe9"}',
            b'{"file_name": "2.jpg", "text": "a cat"}']
    (tmp_path / "captions.csv").unlink()
    (tmp_path / "metadata.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    source = ImageFolderSource(tmp_path)
    assert len(source) == 2 and source.skips.examples["bad_encoding"] == ["metadata.jsonl:2"]
    coco = (b'{"images": [{"id": 0, "file_name": "0.jpg"}, {"id": 1, "file_name": "1.jpg"}], "annotations": '
            b'[{"image_id": 0, "id": 5, "caption": "a dog"}, {"image_id": 1, "id": 6, "caption": "caf\xe9"}]}')
    (tmp_path / "captions_x.json").write_bytes(coco)
    source = build_source("coco", tmp_path / "captions_x.json")
    assert source.skips.examples["bad_encoding"] == ["captions_x.json: annotation 6"]
