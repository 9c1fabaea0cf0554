"""Bad input ends in one line naming the field, file or value, before any work (issue 23 #9, #11):
through ``python -m transfusion_mot.train`` (what ``accelerate launch`` runs), ``caption`` and ``generate``;
and ``generate`` never mixes new images with stale ones."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, debug_overrides

from transfusion_mot import cli, train

DEBUG = str(REPO / "configs" / "debug.yaml")


def _one_line_exit(capsys, fn, *args) -> str:
    """Run ``fn(*args)``; it must stop with SystemExit (a traceback fails the test) and a one-line message."""
    with pytest.raises(SystemExit) as stop:
        fn(*args)
    code = stop.value.code
    err = capsys.readouterr().err + (code if isinstance(code, str) else "")
    assert code not in (0, None), err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_module_entry_malformed_yaml_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  dim: [64\ntrain:\n  steps: 2\n")
    res = subprocess.run([sys.executable, "-m", "transfusion_mot.train", "--config", str(bad)], cwd=REPO,
                         capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip().count("\n") == 0 and str(bad) in res.stderr and "not valid YAML" in res.stderr


@pytest.mark.parametrize("overrides,named", [
    (["model.dimm=64"], "model.dimm"),
    (["model.dim=63"], "model.dim=63"),
    (["model.dim=[64"], "model.dim=[64"),
    (["data.source=imagefolder", "data.path={tmp}/nope"], "nope"),
])
def test_module_entry_config_and_data_errors_are_one_line(capsys, tmp_path, overrides, named):
    overrides = [o.format(tmp=tmp_path) for o in overrides]
    line = _one_line_exit(capsys, train.main, ["--config", DEBUG, *debug_overrides(tmp_path / "run"), *overrides])
    assert named in line


def test_flex_where_torch_has_none_is_refused_before_work(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.nn.attention.flex_attention", None)  # a torch without flex
    run = tmp_path / "run"
    line = _one_line_exit(capsys, train.main, ["--config", DEBUG, *debug_overrides(run), "model.attention=flex"])
    assert "model.attention=flex" in line and not run.exists()


@pytest.fixture
def bad_images(tmp_path) -> dict[str, Path]:
    from transfusion_mot.data.shapes import ShapesDataset

    good = tmp_path / "good.png"
    ShapesDataset("test", 1, 32)[0].image.save(good)
    text = tmp_path / "notes.png"
    text.write_text("not an image at all\n")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    return {"good": good, "text": text, "truncated": truncated}


@pytest.mark.parametrize("which", ["text", "truncated"])
def test_caption_of_a_non_image_or_corrupt_file_is_one_line(debug_run, bad_images, capsys, which):
    line = _one_line_exit(capsys, cli.main, ["caption", "--ckpt", str(debug_run), str(bad_images["good"]),
                                             str(bad_images[which])])
    assert str(bad_images[which]) in line


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_caption_temperature_must_be_finite(debug_run, bad_images, capsys, value):
    line = _one_line_exit(capsys, cli.main, ["caption", "--ckpt", str(debug_run), "--temperature", value,
                                             str(bad_images["good"])])
    assert f"--temperature {float(value)}" in line


@pytest.mark.parametrize("args,named", [
    (["--cfg", "nan"], "--cfg nan"),
    (["--cfg", "inf"], "--cfg inf"),
    (["--n", "0"], "--n 0"),
    (["--seed", str(10 ** 19)], f"--seed {10 ** 19}"),
    (["--device", "cuda:7"] if not __import__("torch").cuda.is_available() else ["--device", "tpu"], "device"),
    (["--dtype", "int8"], "int8"),
])
def test_generate_arguments_are_refused_before_any_folder_is_made(debug_run, tmp_path, capsys, args, named):
    out = tmp_path / "out"
    line = _one_line_exit(capsys, cli.main, ["generate", "--ckpt", str(debug_run), "--prompt", "a red circle",
                                             "--out", str(out), *args])
    assert named in line and not out.exists()


def test_generate_refuses_a_folder_with_images_unless_overwrite(debug_run, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["generate", "--ckpt", str(debug_run), "--steps", "2", "--out", str(out)]
    cli.main([*base, "--prompt", "a red circle", "--prompt", "a blue star", "--n", "2"])
    first = sorted(p.name for p in out.glob("*.png"))
    assert first == ["0000_0.png", "0000_1.png", "0001_0.png", "0001_1.png", "grid.png"]
    line = _one_line_exit(capsys, cli.main, [*base, "--prompt", "a green square"])
    assert "already holds 5 image(s)" in line and "--overwrite" in line
    (out / "notes.txt").write_text("mine")
    cli.main([*base, "--prompt", "a green square", "--n", "4", "--overwrite"])  # replaces: no stale 0001_*.png left
    assert sorted(p.name for p in out.glob("*.png")) == ["0000_0.png", "0000_1.png", "0000_2.png", "0000_3.png",
                                                         "grid.png"]
    assert (out / "notes.txt").read_text() == "mine"  # not generate's: untouched
    (out / "holiday.png").write_bytes((out / "grid.png").read_bytes())
    line = _one_line_exit(capsys, cli.main, [*base, "--prompt", "a green square", "--overwrite"])
    assert "holiday.png" in line and (out / "holiday.png").exists() and (out / "0000_3.png").exists()
