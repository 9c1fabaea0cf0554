"""The training loop end to end: exact resume, two processes == one, a kill mid-save, real-data
sources, and the main job's command (with a small budget) writing every file it promises."""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import MAIN_VAE_STEPS, REPO, debug_overrides, free_port
from PIL import Image as PILImage
from safetensors.torch import load_file

from transfusion_mot.config import load_config
from transfusion_mot.train import train

DEBUG = str(REPO / "configs" / "debug.yaml")
PY = sys.executable
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


def _losses(run: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss_lm"], r["loss_flow"]) for r in rows if "loss_lm" in r and not r.get("final")]


def _weights(run: Path) -> dict:
    return load_file(run / "model" / "model.safetensors")


def test_ema_warmup_note_says_when_the_configured_decay_never_arrives():
    """The decay warms up as (1 + n) / (10 + n): two decays above what a short run reaches give the same
    weights, and the start-up note says so; a run long enough to reach the decay gets no note."""
    from transfusion_mot.components.ema import EMA

    def averaged(decay: float, steps: int) -> tuple[torch.Tensor, EMA]:
        torch.manual_seed(0)
        layer = torch.nn.Linear(3, 3)
        ema = EMA(layer, decay)
        for _ in range(steps):
            with torch.no_grad():
                layer.weight.add_(torch.randn(3, 3))
            ema.update()
        return ema.shadow["weight"], ema

    a, ema_a = averaged(0.995, 40)
    b, _ = averaged(0.998, 40)
    c, _ = averaged(0.8, 40)
    assert torch.equal(a, b) and not torch.equal(a, c)  # 0.8 is reached after 35 updates
    note = ema_a.warmup_note(880)
    assert note is not None and "train.ema_decay=0.995" in note and "1790 updates" in note and "0.9899" in note
    assert ema_a.warmup_note(1791) is None and ema_a.warmup_note(1790) is not None
    assert ema_a.decay_after(1790) == 0.995 and ema_a.decay_after(1789) < 0.995


def _run(out, *extra) -> Path:
    cfg = load_config(DEBUG, debug_overrides(out, "train.log_every=1", "train.save_every=3", *extra))
    return train(cfg, evaluate_at_end=False)


def test_exact_resume(tmp_path, debug_vae):
    straight = _run(tmp_path / "a", "train.steps=6", "train.ema_decay=0.9")
    _run(tmp_path / "b", "train.steps=6", "train.stop_after=3", "train.ema_decay=0.9")
    assert [s for s, *_ in _losses(tmp_path / "b")] == [1, 2, 3]
    resumed = _run(tmp_path / "b", "train.steps=6", "train.resume=auto", "train.ema_decay=0.9")
    assert _losses(straight) == _losses(resumed)  # bitwise: same data, noise, RNG and optimizer state
    wa, wb = _weights(straight), _weights(resumed)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _env():
    return {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow  # two accelerate-launched processes, ~40 s: slow (.ci/run runs it)
def test_two_processes_match_one(tmp_path, debug_vae):
    # 3 steps: the third loss is the first to see an lr from the schedule after a step (accelerate steps a
    # prepared scheduler once per process unless told not to; see build_accelerator).
    common = debug_overrides("X", "train.steps=3", "train.log_every=1", "train.save_every=3")
    one = [a.replace("X", str(tmp_path / "one")) for a in common] + ["data.batch_size=4"]
    two = [a.replace("X", str(tmp_path / "two")) for a in common] + ["data.batch_size=2"]
    subprocess.run([PY, "-m", "transfusion_mot.train", "--config", DEBUG, "--no-eval", *one],
                   check=True, env=_env(), cwd=REPO, capture_output=True)
    res = subprocess.run([ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                          "-m", "transfusion_mot.train", "--config", DEBUG, "--no-eval", *two],
                         env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 3
    for (sa, la, fa), (sb, lb, fb) in zip(a, b):
        assert sa == sb and abs(la - lb) < 1e-5 and abs(fa - fb) < 1e-5
    assert (tmp_path / "two" / "checkpoints" / "step_000003" / "rng" / "rank_1.safetensors").exists()  # both ranks
    # the two-process checkpoint resumes in one process (same global batch)
    more = [a.replace("X", str(tmp_path / "two")) for a in debug_overrides("X", "train.steps=4")] + [
        "data.batch_size=4", "train.resume=auto"]
    res = subprocess.run([PY, "-m", "transfusion_mot.train", "--config", DEBUG, "--no-eval", *more],
                         env=_env(), cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout and _losses(tmp_path / "two")[-1][0] == 4


SLOW_SAVE = textwrap.dedent("""
    import sys, time
    from transfusion_mot.components import checkpoint
    original = checkpoint._write_rng
    def slow(folder, rank):
        out = original(folder, rank)
        if "step_000004" in str(folder):
            print("SAVING", flush=True)
            time.sleep(60)  # killed here: the shards are in step_000004.tmp, not yet renamed
        return out
    checkpoint._write_rng = slow
    from transfusion_mot.train import main
    main(sys.argv[1:])
""")


def test_kill_during_save_keeps_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    args = ["--config", DEBUG, "--no-eval", *debug_overrides(run, "train.steps=8", "train.save_every=2")]
    proc = subprocess.Popen([PY, "-c", SLOW_SAVE, *args], env=_env(), cwd=REPO, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    for line in proc.stdout:
        if "SAVING" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_000002", "step_000004.tmp"], ckpts
    res = subprocess.run([PY, "-m", "transfusion_mot.train", "--resume", "auto", *args], env=_env(), cwd=REPO,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout and "step_000002" in res.stdout
    assert (run / "checkpoints" / "step_000008").is_dir() and (run / "model" / "model.safetensors").exists()


def _images(folder: Path, n: int, size: int = 40):
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        arr = (torch.rand(size, size, 3, generator=g) * 255).byte().numpy()
        PILImage.fromarray(arr).save(folder / f"img{i}.jpg")
    return [f"img{i}.jpg" for i in range(n)]


@pytest.mark.parametrize("kind", ["imagefolder", "webdataset"])
def test_trains_on_real_data_sources(tmp_path, kind):
    data = tmp_path / "data"
    names = _images(data, 6)
    if kind == "imagefolder":
        with open(data / "metadata.jsonl", "w") as f:
            for i, name in enumerate(names):
                f.write(json.dumps({"file_name": name, "text": f"noise picture number {i}"}) + "\n")
        path = data
    else:
        import webdataset as wds

        path = tmp_path / "shard-{000..001}.tar"  # two shards: the last one is held out for validation
        for s in range(2):
            with wds.TarWriter(str(tmp_path / f"shard-{s:03d}.tar")) as sink:
                for i, name in enumerate(names[s::2]):
                    sink.write({"__key__": f"{i:05d}", "jpg": (data / name).read_bytes(), "txt": f"noise {i}"})
    run = tmp_path / "run"
    cfg = load_config(DEBUG, debug_overrides(run, "train.steps=2", f"data.source={kind}", f"data.path={path}",
                                             "codec.vae_steps=5", "data.cache_latents=false"))
    train(cfg, evaluate_at_end=False)
    assert [s for s, *_ in _losses(run)][-1] == 2


def test_main_job_command_writes_everything(tmp_path, main_vae):
    run = tmp_path / "main"
    cmd = [str(Path(sys.executable).with_name("transfusion-mot")), "main", f"train.out_dir={run}", "train.steps=4",
           "train.log_every=2", "eval.n_prompts=4", "eval.sample_steps=2", "eval.val_examples=8", MAIN_VAE_STEPS]
    res = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("config.yaml", "metrics.jsonl", "loss_curves.png", "samples_final.png", "results.json",
                 "report.md", "model/model.safetensors", "model/config.json", "vae/codec.json"):
        assert (run / name).exists(), name
    assert list((run / "checkpoints").glob("step_*"))
    results = json.loads((run / "results.json").read_text())
    for key in ("prompt_following", "prompt_following_chance", "prompt_following_codec", "val_flow", "loss_lm"):
        assert key in results
    assert 0 <= results["prompt_following_chance"] < results["prompt_following_codec"] <= 1
    assert "prompt-following" in res.stdout and "report:" in res.stdout  # the summary table
    assert "vae (" not in res.stderr  # the session's main-job VAE was reused from the cache, not retrained


def test_ctrl_c_saves_like_sigterm(tmp_path, debug_vae):
    from transfusion_mot.components.checkpoint import verify

    run = tmp_path / "run"
    args = ["--config", DEBUG, "--no-eval", *debug_overrides(run, "train.steps=500", "train.log_every=1",
                                                              "train.save_every=0")]
    proc = subprocess.Popen([PY, "-m", "transfusion_mot.train", *args], env=_env(), cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and len(_losses(run)) >= 2:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    saved = re.search(r"SIGINT: saved step (\d+) and stopped", out)
    assert saved, out
    ckpt = run / "checkpoints" / f"step_{int(saved.group(1)):06d}"
    assert verify(ckpt) is None and _losses(run)[-1][0] == int(saved.group(1))
