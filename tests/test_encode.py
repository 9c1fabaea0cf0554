"""Pre-encoded latent shards (``transfusion-mot encode``) and pretrained diffusers VAEs named as users name
them: encode writes latents + token ids + captions per shard, resumes per shard, refuses to mix encodings,
runs in several processes, and training reads the shards with no image decode and no VAE encode."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import REPO, debug_overrides, free_port
from PIL import Image as PILImage

from transfusion_mot.config import ConfigError, load_config
from transfusion_mot.data.encode import encode, read_meta

DEBUG = str(REPO / "configs" / "debug.yaml")
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


def tiny_pipeline(folder: Path, latent_channels: int = 4, levels: int = 3) -> Path:
    """A randomly initialised AutoencoderKL saved as a diffusers pipeline folder (model_index.json + vae/)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                        block_out_channels=(8,) * levels, latent_channels=latent_channels, norm_num_groups=4,
                        scaling_factor=0.7, shift_factor=0.05)
    vae.save_pretrained(folder / "vae")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                         "vae": ["diffusers", "AutoencoderKL"]}))
    return folder


def image_folder(folder: Path, n: int, size: int = 40) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    rows = [{"file_name": "bad.jpg", "text": "broken"}]
    for i in range(n):
        arr = np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)
        PILImage.fromarray(arr).save(folder / f"img{i:02d}.jpg")
        rows.append({"file_name": f"img{i:02d}.jpg", "text": f"noise picture {i}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture
def setup(tmp_path: Path):
    data, pipe = image_folder(tmp_path / "images", 11), tiny_pipeline(tmp_path / "pipe")
    overrides = debug_overrides(tmp_path / "run", "data.source=imagefolder", f"data.path={data}",
                                "data.val_fraction=0.25", "codec.kind=diffusers", f"codec.path={pipe}",
                                "codec.subfolder=vae")
    return tmp_path, overrides


def test_encode_writes_resumable_shards(setup):
    tmp_path, overrides = setup
    out = tmp_path / "latents"
    cfg = load_config(DEBUG, overrides)
    encode(cfg, out, shard_size=4, report=lambda msg: None)
    meta = read_meta(out)
    assert meta["latent_shape"] == [4, 8, 8] and meta["tokenizer"] == "bytes" and meta["resolution"] == 32
    assert meta["codec"]["config"]["subfolder"] == "vae" and meta["codec"]["name"].startswith("vae-")
    assert meta["splits"]["train"] == {"shards": 3, "samples": 8, "skips": meta["splits"]["train"]["skips"]}
    assert meta["splits"]["train"]["skips"]["counts"] == {"unreadable": 1}  # bad.jpg, counted, not fatal
    assert meta["splits"]["val"]["samples"] == 3
    samples = list(wds.WebDataset(str(out / "train" / "000000.tar"), shardshuffle=False))
    assert len(samples) == 3  # bad.jpg, img00, img01, img02: the unit's 4 records, less the bad one
    latent = np.load(io.BytesIO(samples[0]["npy"]))
    info = json.loads(samples[0]["json"])
    assert latent.shape == (4, 8, 8) and latent.dtype == np.float16
    assert info["captions"] == ["noise picture 0"] and info["ids"] == [list(b"noise picture 0")]
    # resumable per shard: only the missing shard is encoded again
    (out / "train" / "000001.json").unlink()
    (out / "train" / "000001.tar").unlink()
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "train").iterdir()}
    encode(cfg, out, shard_size=4, report=lambda msg: None)
    after = {p.name: p.stat().st_mtime_ns for p in (out / "train").iterdir()}
    assert set(after) == set(stamps) | {"000001.json", "000001.tar"}
    assert all(after[name] == stamps[name] for name in stamps)
    with pytest.raises(ValueError, match="holds latents of another encoding"):
        encode(load_config(DEBUG, overrides + ["data.resolution=64", "model.latent_size=16"]), out, shard_size=4)


def test_training_reads_latents_without_decoding_or_encoding(setup, monkeypatch):
    from transfusion_mot.data import codec, sources
    from transfusion_mot.data.packing import Specials
    from transfusion_mot.data.pipeline import (build_records, build_stream, load_run_codec, prepare_codec,
                                               prepare_tokenizer)

    tmp_path, overrides = setup
    out = tmp_path / "latents"
    encode(load_config(DEBUG, overrides), out, shard_size=4, dtype="float32", report=lambda msg: None)
    # the user names only the latents: codec and geometry come from encode.json
    cfg = load_config(DEBUG, debug_overrides(tmp_path / "run2", "data.source=latents", f"data.path={out}"))

    def forbidden(*args, **kwargs):
        raise AssertionError("training from latents decoded an image or ran the VAE encoder")

    monkeypatch.setattr(sources, "open_image", forbidden)
    monkeypatch.setattr(codec.LatentCodec, "encode", forbidden)
    records = build_records(cfg.data, "train")
    vae, enc = prepare_codec(cfg, tmp_path / "run2", records=records)
    assert vae.name == read_meta(out)["codec"]["name"]
    assert load_run_codec(cfg, tmp_path / "run2").name == vae.name  # what generate loads for this run
    tok = prepare_tokenizer(cfg)
    stream = build_stream(records, tok, enc, cfg, Specials.of(tok), report=lambda msg: None)
    batches = [next(stream) for _ in range(3)]
    assert all((b.image_shape == torch.tensor([4, 8, 8])).all() for b in batches)
    stored = {json.loads(s["json"])["key"]: torch.from_numpy(np.load(io.BytesIO(s["npy"])))
              for s in wds.WebDataset(str(out / "train" / "{000000..000002}.tar"), shardshuffle=False)}
    assert any(torch.equal(batches[0].latents()[0], lat) for lat in stored.values())  # the stored latents, as is
    with pytest.raises(ValueError, match="data.tokenizer='shapes-words' but the latents"):
        prepare_codec(load_config(DEBUG, ["data.source=latents", f"data.path={out}", "data.tokenizer=shapes-words"]),
                      tmp_path / "run3", records=records)
    other = tiny_pipeline(tmp_path / "other", levels=3)
    with pytest.raises(ValueError, match="is not the codec"):
        prepare_codec(load_config(DEBUG, ["data.source=latents", f"data.path={out}", "codec.kind=diffusers",
                                          f"codec.path={other}", "codec.subfolder=vae", "codec.scaling_factor=2.0"]),
                      tmp_path / "run3", records=records)


def test_imagefolder_with_a_pretrained_vae_config_trains(setup):
    """configs/imagefolder_pretrained_vae.yaml as a user runs it, offline: a captioned folder + a local pipeline."""
    from transfusion_mot.train import train

    tmp_path, _ = setup
    config = str(REPO / "configs" / "imagefolder_pretrained_vae.yaml")
    overrides = debug_overrides(
        tmp_path / "run", f"data.path={tmp_path / 'images'}", f"codec.path={tmp_path / 'pipe'}", "model.size=debug",
        "data.seq_len=128", "data.max_caption_tokens=40", "data.batch_size=2", "data.num_workers=0", "train.steps=2")
    with pytest.raises(ConfigError, match="model.latent_size=8 but data.resolution=64 / the codec's factor 4 = 16"):
        load_config(config, [*overrides, "model.latent_size=8", "data.resolution=64"])  # 3 levels: 4x down, not 8x
    # left at 0, the latent shape comes from the VAE's config
    cfg = load_config(config, [*overrides, "data.resolution=32", "model.latent_channels=0", "model.latent_size=0"])
    assert cfg.codec.subfolder == "vae" and (cfg.model.latent_channels, cfg.model.latent_size) == (4, 8)
    run = train(cfg, evaluate_at_end=False)
    assert (run / "model" / "model.safetensors").exists()



@pytest.mark.slow  # two accelerate-launched processes, ~20 s: slow (.ci/run runs it)
def test_encode_in_two_processes(setup):
    tmp_path, overrides = setup
    out = tmp_path / "latents2"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                          "-m", "transfusion_mot.data.encode", "--config", DEBUG, "--out", str(out),
                          "--shard-size", "2", *overrides], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[0] train shard 1/5" in res.stdout and "[1] train shard 2/5" in res.stdout  # units split by rank
    meta = read_meta(out)
    assert meta["splits"]["train"]["shards"] == 5 and meta["splits"]["train"]["samples"] == 8
    single = tmp_path / "latents1"
    encode(load_config(DEBUG, overrides), single, shard_size=2, report=lambda msg: None)
    for name in sorted(p.name for p in (out / "train").glob("*.tar")):  # what one process writes (tar times aside)
        a, b = (list(wds.WebDataset(str(d / "train" / name), shardshuffle=False)) for d in (out, single))
        assert [(x["__key__"], x["npy"], x["json"]) for x in a] == [(x["__key__"], x["npy"], x["json"]) for x in b]


def test_encode_with_the_trained_vae_keeps_it(tmp_path: Path):
    """The default codec (our small VAE, trained on the data first) travels with the latents and the run."""
    from transfusion_mot.data.pipeline import build_records, load_run_codec, prepare_codec

    overrides = ["data.shapes_train_size=40", "data.shapes_val_size=8", "codec.vae_steps=3"]
    out = encode(load_config(DEBUG, overrides), tmp_path / "latents", shard_size=16, report=lambda msg: None)
    meta = read_meta(out)
    assert meta["codec"]["config"]["path"] == str(out / "vae") and (out / "vae" / "codec.json").is_file()
    assert meta["splits"]["train"] == {"shards": 3, "samples": 40, "skips": meta["splits"]["train"]["skips"]}
    cfg = load_config(DEBUG, ["data.source=latents", f"data.path={out}"])
    codec, _ = prepare_codec(cfg, tmp_path / "run", records=build_records(cfg.data))
    assert (tmp_path / "run" / "vae" / "codec.json").is_file()  # copied: the run decodes without the latents
    assert load_run_codec(cfg, tmp_path / "run").name == codec.name == meta["codec"]["name"]
