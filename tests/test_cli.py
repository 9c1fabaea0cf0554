"""``transfusion-mot generate|caption``: outputs on a trained debug run, and every bad input is a clear
error before any work, with nothing half-written."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from transfusion_mot import from_pretrained

CLI = str(Path(sys.executable).with_name("transfusion-mot"))


def _cli(*args, ok=True):
    res = subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, env=dict(os.environ), timeout=300)
    if ok:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_generate_writes_pngs_and_grid(debug_run, tmp_path):
    out = tmp_path / "gen"
    _cli("generate", "--ckpt", debug_run, "--prompt", "a large red circle", "--prompt", "two blue stars",
         "--steps", 3, "--cfg", 2.0, "--n", 2, "--out", out)
    assert sorted(p.name for p in out.glob("*.png")) == ["0000_0.png", "0000_1.png", "0001_0.png", "0001_1.png",
                                                         "grid.png"]


def test_python_api_reproducible_and_captions(debug_run):
    pipe = from_pretrained(debug_run)
    a = pipe.generate(["a small green square"], steps=3, seed=4, n=2)
    b = pipe.generate(["a small green square"], steps=3, seed=4, n=2)
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b) and 0 <= a.min() and a.max() <= 1
    caps = pipe.caption(a, max_new_tokens=8)
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)


def test_caption_command(debug_run, tmp_path):
    from transfusion_mot.data.shapes import ShapesDataset

    path = tmp_path / "x.png"
    ShapesDataset("test", 1, 32)[0].image.save(path)
    res = _cli("caption", "--ckpt", debug_run, path)
    assert res.stdout.startswith(str(path) + "\t")


@pytest.mark.parametrize("args,message", [
    (["--ckpt", "{missing}", "--prompt", "x"], "does not exist"),
    (["--prompt", ""], "empty"),
    (["--prompt", "x", "--steps", "0"], "--steps 0"),
    (["--prompt", "x", "--cfg", "-1"], "--cfg -1"),
    ([], "at least one --prompt"),
    (["--prompt", "x", "--out", "{unwritable}"], "not writable"),
])
def test_generate_errors_before_any_work(debug_run, tmp_path, capsys, args, message):
    """Through ``cli.main(argv)`` in this process (the happy path and a bad checkpoint run the real command
    in a subprocess above and below): six interpreter start-ups saved."""
    from transfusion_mot import cli

    blocker = tmp_path / "file"
    blocker.write_text("")
    out = tmp_path / "out"
    args = [a.format(missing=tmp_path / "nope", unwritable=blocker / "sub") for a in args]
    base = {"--ckpt": str(debug_run), "--out": str(out)}
    for flag in ("--ckpt", "--out"):
        if flag not in args:
            args += [flag, base[flag]]
    with pytest.raises(SystemExit) as stop:  # any other exception (a traceback) fails the test
        cli.main(["generate", *args])
    code = stop.value.code  # SystemExit("error: ...") prints its message to stderr and exits 1
    err = capsys.readouterr().err + (code if isinstance(code, str) else "")
    assert code not in (0, None) and message in err, err
    assert not any(out.glob("*.png")) if out.exists() else True


def test_incompatible_checkpoint_is_named(debug_run, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(debug_run / "model", bad / "model")
    cfg = (bad / "model" / "config.json").read_text().replace('"dim": 64', '"dim": 32')
    (bad / "model" / "config.json").write_text(cfg)
    res = _cli("generate", "--ckpt", bad, "--prompt", "x", "--out", tmp_path / "o", ok=False)
    assert res.returncode != 0 and "do not fit" in res.stderr and "Traceback" not in res.stderr
