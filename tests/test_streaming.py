"""Streamed webdataset shards (data/streaming.py): the lane contract (position -> sample does not depend
on processes or loader workers), exact resume from the saved lane state, the re-sharding rule and its
refusals, bad records and bad shards counted, and a clear stop when shards hold nothing."""
from __future__ import annotations

import io
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import REPO
from PIL import Image as PILImage

from transfusion_mot.config import load_config
from transfusion_mot.data.packing import Specials
from transfusion_mot.data.pipeline import build_records, build_stream, prepare_tokenizer
from transfusion_mot.data.streaming import LanePlan, NoUsableData, ShardSource, expand_shards

DEBUG = str(REPO / "configs" / "debug.yaml")


def jpeg(seed: int, size: int = 40) -> bytes:
    buf = io.BytesIO()
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    PILImage.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def write_shards(folder: Path, sizes: list[int], bad: set[tuple[int, int]] = frozenset()) -> Path:
    """Shards s-000.tar ... with sizes[s] samples each; (shard, i) in ``bad`` gets a truncated JPEG."""
    folder.mkdir(parents=True, exist_ok=True)
    for s, n in enumerate(sizes):
        with wds.TarWriter(str(folder / f"s-{s:03d}.tar")) as sink:
            for i in range(n):
                data = jpeg(1000 * s + i)
                sink.write({"__key__": f"{i:05d}", "jpg": data[:100] if (s, i) in bad else data,
                            "txt": f"shard {s} sample {i}"})
    return folder


def config(path: Path, *extra: str):
    return load_config(DEBUG, ["data.source=webdataset", f"data.path={path}", "data.val_fraction=0",
                               "data.stream_lanes=4", *extra])


def fake_encode(keys, pixels):  # (N, 3, 32, 32) -> (N, 4, 8, 8): the debug model's latent shape, no VAE
    pooled = torch.nn.functional.avg_pool2d(pixels, 4)
    return torch.cat([pooled, pooled[:, :1]], 1)


def stream(cfg, rank=0, world=1, start=0, state=None):
    tok = prepare_tokenizer(cfg)
    return build_stream(build_records(cfg.data), tok, fake_encode, cfg, Specials.of(tok), rank, world,
                        start=start, state=state, report=lambda msg: None)


def keys_by_position(cfg, n_batches: int, world: int = 1, state=None, start=0) -> dict[int, str]:
    """{position: record key} of the first ``n_batches`` global batches, reading as ``world`` ranks."""
    out = {}
    for rank in range(world):
        s = stream(cfg, rank, world, start, state)
        for _ in range(n_batches * s.per_batch):
            item = s._take()
            out[item.position] = item.prepared.key if item.prepared is not None else None
    return out


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    return write_shards(tmp_path / "shards", [5, 7, 4, 6, 5, 3, 6, 4])


def test_expand_shards_lists_without_reading(tmp_path: Path, shards: Path):
    # Start-up lists shards and reads none: a pipe that would fail and a URL are only strings here.
    assert expand_shards("pipe:false") == ["pipe:false"]
    src = ShardSource(expand_shards("https://example.invalid/cc12m-{00000..00002}.tar"))
    assert src.shards[-1] == "https://example.invalid/cc12m-00002.tar" and src.skips.total == 0
    assert len(expand_shards(f"{shards}/s-00[0-3].tar::{shards}/s-007.tar")) == 5


def test_lane_plan_permutes_shards_per_epoch():
    plan = LanePlan(n_shards=10, lanes=4, seed=3)
    epoch0 = sorted(i for lane in range(4) for i in plan.shards(lane, 0))
    assert epoch0 == list(range(10))  # every shard once per epoch, across the lanes
    assert [plan.shards(lane, 0) for lane in range(4)] != [plan.shards(lane, 1) for lane in range(4)]
    assert LanePlan(10, 4, 3).shards(2, 5) == plan.shards(2, 5)  # a pure function of (seed, epoch)
    assert LanePlan(3, 64, 0).lanes == 3  # never more lanes than shards
    assert [plan.consumed_before(lane, 10) for lane in range(4)] == [3, 3, 2, 2]


def test_same_examples_for_any_world_size_and_workers(shards: Path):
    """Position p is the same sample (and the same prepared example) however many processes read it."""
    one = keys_by_position(config(shards, "data.batch_size=4"), 4)
    two = keys_by_position(config(shards, "data.batch_size=2"), 4, world=2)
    workers = keys_by_position(config(shards, "data.batch_size=4", "data.num_workers=2"), 4)
    both = keys_by_position(config(shards, "data.batch_size=2", "data.num_workers=2"), 4, world=2)
    assert sorted(one) == list(range(16)) and one == two == workers == both
    assert len(set(one.values())) == 16  # no sample twice within the first epoch's positions
    # position p is lane p mod 4: consecutive positions come from four different shards
    assert len({one[p].split("/")[0] for p in range(4)}) == 4


def _equal(a, b) -> bool:
    """Every field of two batches equal: tensors, and the per-modality dicts (``values``, ``time``) key by key."""
    def same(x, y):
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        return torch.equal(x, y)
    return all(same(getattr(a, f.name), getattr(b, f.name)) for f in fields(a))


def test_resume_gives_the_same_batches(shards: Path):
    cfg = config(shards)
    straight = stream(cfg)
    expected = [next(straight) for _ in range(12)]  # ~1.3 epochs: lanes change shards and epochs
    first = stream(cfg)
    for _ in range(5):
        next(first)
    state = first.state_dict()
    assert state["position"] == 5 * first.per_batch and len(state["lanes"]) == 4
    for extra in ([], ["data.num_workers=2"]):  # more loader workers on resume: same batches
        resumed = stream(config(shards, *extra), start=5, state=state)
        assert all(_equal(next(resumed), b) for b in expected[5:])
        assert resumed.next_index == 12


def test_resume_on_another_world_size(shards: Path):
    """Re-sharding rule: 2 ranks saved, 1 rank (same global batch) resumes at the next unseen position."""
    cfg2 = config(shards, "data.batch_size=2")
    ranks = [stream(cfg2, r, 2) for r in range(2)]
    for s in ranks:
        for _ in range(3):
            next(s)
    rows = sorted(row for s in ranks for row in s.state_dict()["lanes"])  # what gather() collects
    state = {**ranks[0].state_dict(), "lanes": rows}
    resumed = keys_by_position(config(shards, "data.batch_size=4"), 2, world=1, state=state, start=3)
    straight = keys_by_position(config(shards, "data.batch_size=4"), 5)
    assert min(resumed) == 3 * 4 and {p: straight[p] for p in resumed} == resumed


def test_refused_resumes_and_layouts(shards: Path, tmp_path: Path):
    with pytest.raises(ValueError, match=r"multiple of processes x loader workers = 3 x 1 = 3"):
        stream(config(shards), 0, 3)
    s = stream(config(shards))
    next(s)
    state = s.state_dict()
    other = write_shards(tmp_path / "other", [3, 3, 3, 3])
    with pytest.raises(ValueError, match="cannot resume the shard stream exactly: source was"):
        stream(config(other), start=1, state=state)
    with pytest.raises(ValueError, match="n_lanes was 4, now 8"):
        stream(config(shards, "data.stream_lanes=8"), start=1, state=state)
    broken = {**state, "lanes": [[lane, 0, 0, 0, 0] for lane in range(4)]}
    with pytest.raises(ValueError, match="inconsistent"):
        stream(config(shards), start=1, state=broken)
    with pytest.raises(ValueError, match="holds no shard-stream position"):
        stream(config(shards), start=1, state={})


def test_bad_records_and_a_batch_of_them_are_skipped_and_counted(tmp_path: Path):
    # lanes 0..3 with one shard each; position p is lane p mod 4: positions 4..7 (batch 1) are all bad
    bad = {(s, 1) for s in range(4)}
    path = write_shards(tmp_path / "bad", [3, 3, 3, 3], bad)
    cfg = config(path)
    s = stream(cfg)
    keys_of_batch = []
    for _ in range(2):
        batch = next(s)
        keys_of_batch.append(batch.n_images)
    assert keys_of_batch == [4, 4] and s.next_index == 3 and s.empty_batches == 1
    assert s.skips.counts == {"unreadable": 4}


def test_shards_without_samples_stop_clearly(tmp_path: Path):
    path = write_shards(tmp_path / "empty", [0, 0])
    (path / "s-002.tar").write_bytes(b"not a tar file at all")
    with pytest.raises(NoUsableData, match=r"found no sample.*bad_shard"):
        next(stream(config(path)))
    every_record_bad = write_shards(tmp_path / "allbad", [2, 2], {(0, 0), (0, 1), (1, 0), (1, 1)})
    with pytest.raises(NoUsableData, match="no usable record in a whole epoch"):
        next(stream(config(every_record_bad, "data.stream_lanes=2")))


def test_held_out_shards_and_pipe_shards_train_the_same(shards: Path):
    cfg = load_config(DEBUG, ["data.source=webdataset", f"data.path={shards}", "data.val_fraction=0.25"])
    train, val = build_records(cfg.data, "train"), build_records(cfg.data, "val")
    assert len(train.shards) == 6 and val.shards == expand_shards(shards)[6:]
    piped = f"pipe:cat {shards}/s-{{000..007}}.tar"
    a, b = stream(config(shards)), stream(config(piped))
    assert all(_equal(next(a), next(b)) for _ in range(3))
    # a pipe cannot seek: its lanes resume by skipping samples by count, to the same batches
    resumed = stream(config(piped), start=3, state=b.state_dict())
    assert all(_equal(next(resumed), next(a)) for _ in range(4))


@pytest.mark.slow  # two accelerate launches: ~30 s on an idle 2-core CPU
def test_two_processes_save_every_lane_and_one_resumes(shards: Path, tmp_path: Path):
    """accelerate launch, 2 gloo processes: the checkpoint holds both ranks' lanes (gathered), and one process
    with the same global batch resumes from it (the re-sharding rule)."""
    import json
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    args = ["-m", "transfusion_mot.train", "--config", DEBUG, "--no-eval", "data.source=webdataset",
            f"data.path={shards}", "data.val_fraction=0.25", "data.stream_lanes=4", f"train.out_dir={run}",
            "codec.vae_steps=3", "train.ema_decay=0", "train.log_every=1"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    res = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), *args,
                          "data.batch_size=2", "train.steps=3", "train.save_every=3"],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    res = subprocess.run([sys.executable, *args, "data.batch_size=4", "train.steps=4", "train.resume=auto"],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout and "step_000003" in res.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss_lm" in r] == [1, 2, 3, 4]  # the training steps (setup rows aside)
