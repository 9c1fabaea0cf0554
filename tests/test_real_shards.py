"""Real data end to end: webdataset shards written from the Flickr8k and COCO subsets in ../shared/assets,
encoded once with TAEF2, the debug model trained from the latent shards, killed (SIGKILL) after a checkpoint
and resumed: the batches and losses after the resume equal those of an uninterrupted run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import webdataset as wds
from conftest import REPO, debug_overrides
from helpers import train_recording

from transfusion_mot.config import load_config
from transfusion_mot.data.encode import encode, read_meta
from transfusion_mot.data.sources import build_source

DEBUG = str(REPO / "configs" / "debug.yaml")


def write_shards(assets: Path, out: Path) -> Path:
    """Flickr8k (jpg + txt) and COCO (jpg + json caption) samples in the img2dataset layout, 6 shards."""
    out.mkdir(parents=True)
    flickr = build_source("imagefolder", assets / "images" / "flickr8k-1000")
    coco = build_source("coco", assets / "images" / "coco-mini" / "captions_val2017_subset.json")
    pairs = [("flickr", flickr.root / name, caps) for name, caps in flickr.items[:24]]
    pairs += [("coco", coco.image_dir / name, caps) for name, _, caps in coco.items[:12]]
    for s in range(6):
        with wds.TarWriter(str(out / f"real-{s:03d}.tar")) as sink:
            for i, (kind, path, caps) in enumerate(pairs[s::6]):
                text = {"txt": caps[0]} if kind == "flickr" else {"json": {"caption": caps[0], "source": "coco"}}
                sink.write({"__key__": f"{s:03d}{i:04d}", "jpg": path.read_bytes(), **text})
    return out


KILL_AFTER_SAVE = textwrap.dedent("""
    import os, signal, sys
    from transfusion_mot import train
    from transfusion_mot.components import resume
    original = resume.save_checkpoint
    def save_then_die(engine, run_dir, snap, *args, **kwargs):
        out = original(engine, run_dir, snap, *args, **kwargs)
        if snap.state.step == 4:
            os.kill(os.getpid(), signal.SIGKILL)  # no clean-up of any kind: as a crashed node
        return out
    resume.save_checkpoint = save_then_die
    train.main(sys.argv[1:])
""")


def _losses(run: Path) -> list:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss_lm"], r["loss_flow"]) for r in rows if "loss_lm" in r]


@pytest.mark.slow  # real shards encoded, trained, killed and resumed, ~60 s: slow (.ci/run runs it)
def test_real_shards_encode_train_kill_resume(assets_dir: Path, tmp_path: Path, monkeypatch):
    shards = write_shards(assets_dir, tmp_path / "shards")
    enc_cfg = load_config(DEBUG, ["data.source=webdataset", f"data.path={shards}/real-{{000..005}}.tar",
                                  "data.val_fraction=0.2", "data.resolution=64", "codec.kind=taef2",
                                  f"codec.path={assets_dir / 'vae'}", "model.latent_channels=32"])
    latents = encode(enc_cfg, tmp_path / "latents", report=lambda msg: None)
    meta = read_meta(latents)
    assert meta["codec"]["name"] == "taef2" and meta["latent_shape"] == [32, 8, 8]
    assert meta["splits"]["train"]["samples"] == 30 and meta["splits"]["val"]["samples"] == 6

    def overrides(run: Path, *extra: str) -> list[str]:
        return debug_overrides(run, "data.source=latents", f"data.path={latents}", "data.resolution=64",
                               "model.latent_channels=32", "train.steps=6", "train.save_every=2",
                               "train.log_every=1", "data.stream_lanes=4", *extra)

    straight = train_recording(load_config(DEBUG, overrides(tmp_path / "straight")), monkeypatch)[1]
    killed = tmp_path / "killed"
    res = subprocess.run([sys.executable, "-c", KILL_AFTER_SAVE, "--config", DEBUG, "--no-eval", *overrides(killed)],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == -9, res.stderr[-2000:]  # killed right after the step-4 checkpoint
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
    resumed = train_recording(load_config(DEBUG, overrides(killed, "train.resume=auto")), monkeypatch)[1]
    assert len(resumed) == 2  # steps 5 and 6, from the lanes' saved positions
    for after, before in zip(resumed, straight[4:]):
        for a, b in zip(after, before):
            assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("tokens", "patches", "image_shape", "t", "image_seed"))
    assert _losses(killed) == _losses(tmp_path / "straight")  # bitwise
