"""The eval/ scripts end to end on a finished debug run, in subprocesses, with tiny inputs."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from test_metrics import tiny_clip  # noqa: F401  (the fixture: a random CLIP saved locally)

EVAL = REPO / "eval" / "metrics"  # a user's scoring scripts; each finds eval/common.py itself


def _run(script: str, *args, ok: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, str(EVAL / script), *map(str, args)], cwd=REPO, capture_output=True,
                         text=True, timeout=300)  # as a user runs it: no PYTHONPATH of ours for eval/
    if ok:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


def _main(script: str, *args) -> None:
    """The script's ``main(argv)`` in this process: the same code path as ``_run`` without paying for a
    fresh interpreter and its imports (~6 s each on the CI machine); used for a test's second script run."""
    import importlib

    folder = str(next((REPO / "eval").glob(f"*/{script}")).parent)  # metrics/ or benchmarks/
    if folder not in sys.path:
        sys.path.insert(0, folder)
    importlib.import_module(script.removesuffix(".py")).main([str(a) for a in args])


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _ref_images(folder: Path, n: int = 6) -> Path:
    from transfusion_mot.data.shapes import ShapesDataset

    folder.mkdir()
    ds = ShapesDataset("val", n, 32)
    for i in range(n):
        ds[i].image.save(folder / f"{i}.png")
    return folder


def _prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("a large red circle\ntwo small blue squares\na large green star\na small yellow triangle\n")
    return path


def test_fid_stops_before_generating_without_weights(debug_run, tmp_path):
    out = tmp_path / "fid"
    res = _run("fid.py", "--ckpt", debug_run, "--prompts", _prompts(tmp_path), "--ref-dir", tmp_path,
               "--out", out, "--backend", "legacy_tensorflow", "--inception", tmp_path / "nope.pt", ok=False)
    assert res.returncode != 0 and "--inception" in res.stderr and "nope.pt" in res.stderr
    assert not (out / "images").exists()  # nothing generated


def test_fd_resnet56_script(debug_run, tmp_path, assets_dir):
    out = tmp_path / "fd"
    _run("fid.py", "--ckpt", debug_run, "--prompts", _prompts(tmp_path), "--ref-dir", _ref_images(tmp_path / "ref"),
         "--out", out, "--steps", 2, "--features", "resnet56",
         "--features-weights", assets_dir / "features" / "resnet56-cifar10.th")
    r = _results(out)
    assert r["metric"] == "FD-resnet56" and r["value"] > 0 and len(list((out / "images").glob("*.png"))) == 4


def test_clip_score_script(debug_run, tmp_path, tiny_clip):  # noqa: F811
    out = tmp_path / "clip"
    _run("clip_score.py", "--ckpt", debug_run, "--prompts", _prompts(tmp_path), "--out", out, "--steps", 2,
         "--clip", tiny_clip)
    assert _results(out)["metric"] == "CLIPScore" and _results(out)["value"] >= 0


def test_val_loss_script_is_reproducible(debug_run, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _run("val_loss.py", "--ckpt", debug_run, "--out", a, "--n", 8, "--grid", 4)
    _main("val_loss.py", "--ckpt", debug_run, "--out", b, "--n", 8, "--grid", 4, "--batch-size", 3)
    ra, rb = _results(a), _results(b)
    assert ra["val_flow"] == pytest.approx(rb["val_flow"], abs=1e-6) and len(
        [k for k in ra if k.startswith("val_flow_t")]) == 4


def test_val_loss_and_cider_on_coco(debug_run, tmp_path, assets_dir):
    coco = assets_dir / "images" / "coco-mini" / "captions_val2017_subset.json"
    out = tmp_path / "val"
    _run("val_loss.py", "--ckpt", debug_run, "--source", "coco", "--path", coco, "--n", 4, "--grid", 2, "--out", out)
    assert _results(out)["n"] == 4 and _results(out)["val_caption_nll"] > 0
    out = tmp_path / "cider"
    _main("caption_cider.py", "--ckpt", debug_run, "--coco-json", coco, "--n", 3, "--out", out)
    assert _results(out)["metric"] == "CIDEr" and _results(out)["n"] == 3


def test_prompt_following_script_resumes(debug_run, tmp_path):
    out = tmp_path / "pf"
    _run("prompt_following.py", "--ckpt", debug_run, "--n", 4, "--steps", 2, "--batch-size", 2, "--out", out)
    first = _results(out)
    assert 0 <= first["prompt_following"] <= 1 and "chance" in first and (out / "grid.png").exists()
    stamps = {p: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")}
    (out / "images" / "000003.png").unlink()  # as if killed before the last image
    _main("prompt_following.py", "--ckpt", debug_run, "--n", 4, "--steps", 2, "--batch-size", 2, "--out", out)
    after = {p: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")}
    assert len(after) == 4 and all(after[p] == stamps[p] for p in stamps if p.name != "000003.png")
    assert _results(out)["prompt_following"] == first["prompt_following"]  # same seed per image: same images


def test_bench_backbone_writes_ratios_goals_and_notes(tmp_path):
    """The backbone benchmark end to end at a toy batch: both ratios, every goal, the notes; too few reps refused."""
    _main("bench_backbone.py", "--sizes", "debug", "--reps", "10", "--warmup", "1", "--rows", "2", "--seq-len", "64",
          "--out", tmp_path)
    record = json.loads((tmp_path / "bench_backbone.json").read_text())
    (row,) = record["results"]
    assert (row["size"], row["rows"], row["seq_len"], row["reps"]) == ("debug", 2, 64, 10)
    assert row["image_token_share"] == 0.5 and row["mot_over_dense"] > 0 and row["dense_over_floor"] > 0
    assert set(row["cpu_share"]) == {"busy", "idle", "steal"} and abs(sum(row["cpu_share"].values()) - 1) < 0.01
    assert set(record["goals"]) == {"debug:mot_over_dense", "debug:dense_over_floor"}
    md = (tmp_path / "bench_backbone.md").read_text()
    assert "| debug | 2 x 64 | 10 |" in md and "## Where MoT's extra time goes" in md
    with pytest.raises(SystemExit):
        _main("bench_backbone.py", "--reps", "5", "--out", tmp_path)


def test_bench_backbone_compiled_shapes(tmp_path):
    """Issue 19's shapes with compiled blocks (dynamo only here: the plumbing, not inductor's speed): 36 text
    tokens and 64 patches per 100-token row, compiled MoT/dense and compiled/eager dense with their goals."""
    _main("bench_backbone.py", "--sizes", "256x4", "--compile", "--compile-backend", "eager", "--reps", "10",
          "--warmup", "1", "--rows", "1", "--name", "compiled", "--no-profile", "--out", tmp_path)
    record = json.loads((tmp_path / "compiled.json").read_text())
    (row,) = record["results"]
    assert (row["dim"], row["n_layers"], row["rows"], row["seq_len"]) == (256, 4, 1, 100)
    assert row["image_token_share"] == 0.64 and row["padding_share"] == 0
    assert set(row["median_ms"]) == {"mot", "dense", "floor", "floor_mot", "mot_compiled", "dense_compiled",
                                     "floor_compiled", "floor_mot_compiled"}
    assert row["floor_mot_over_floor"] > 0 and row["compiled_floor_mot_over_floor"] > 0
    assert row["compiled_mot_over_dense"] > 0 and row["compiled_dense_over_eager"] > 0
    assert {"256x4:compiled_mot_over_dense", "256x4:compiled_dense_over_eager"} <= set(record["goals"])
    assert "| 256x4 | 1 x 100 |" in (tmp_path / "compiled.md").read_text()
