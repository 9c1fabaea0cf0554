"""Inference on any device and dtype (issue 19 #4): ``from_pretrained(device=, dtype=)``, ``pipe.to``, bf16
generation close to fp32, and FID/CLIP-style generation split across processes with ``accelerate launch``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, free_port
from PIL import Image as PILImage

from transfusion_mot import from_pretrained
from transfusion_mot.sample import sample_latents

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
EVAL = REPO / "eval" / "metrics"


def test_device_and_dtype_defaults_and_pipe_to(debug_run):
    pipe = from_pretrained(debug_run)  # no CUDA here: CPU, float32 (bf16 is the CUDA default)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pipe.device.type == expected and pipe.dtype == (torch.bfloat16 if expected == "cuda" else torch.float32)
    half = from_pretrained(debug_run, device="cpu", dtype="bf16")
    assert half.device.type == "cpu" and half.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in half.codec.parameters())  # the codec decodes in float32
    assert half.to(dtype="fp32") is half and half.dtype == torch.float32 and half.device.type == "cpu"
    assert half.to("cpu", torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="int8"):
        from_pretrained(debug_run, device="cpu", dtype="int8")


def test_bf16_generation_is_close_to_fp32_in_latent_space(debug_run):
    """Same prompts, same noise, 10 CFG steps: bf16 weights move the latents as fp32 does, to 5% (measured
    0.4%), and the bf16 pipeline decodes and captions."""
    fp32 = from_pretrained(debug_run, device="cpu", dtype="fp32")
    bf16 = from_pretrained(debug_run, device="cpu", dtype="bf16")
    ids = fp32.encode_prompts(["a large red circle", "two small blue squares", "a green star"])
    m = fp32.cfg.model
    noise = torch.randn(3, m.latent_channels, m.latent_size, m.latent_size, generator=torch.Generator().manual_seed(0))
    moved = [sample_latents(p.model, ids, p.specials, noise, steps=10, cfg_scale=3.0) - noise for p in (fp32, bf16)]
    assert all(torch.isfinite(x).all() for x in moved)
    assert float(moved[0].norm() / noise.norm()) > 0.05  # the model does move the latents
    assert float((moved[1] - moved[0]).norm() / moved[0].norm()) < 0.05
    images = bf16.generate(["a large red circle"], steps=3, n=2)
    assert images.dtype == torch.float32 and images.shape == (2, 3, 32, 32)
    assert len(bf16.caption(images, max_new_tokens=4)) == 2



@pytest.mark.slow  # two accelerate-launched processes, ~25 s: slow (.ci/run runs it)
def test_generation_split_across_two_processes_equals_one(debug_run, tmp_path):
    """``accelerate launch --num_processes 2 eval/metrics/prompt_following.py``: each process its share of the
    chunks, images written by index; the union is the one-process run's images and score."""
    args = ["--ckpt", debug_run, "--n", "5", "--steps", "2", "--batch-size", "2", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(EVAL), os.environ.get("PYTHONPATH", "")]),
           "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    res = subprocess.run([sys.executable, str(EVAL / "prompt_following.py"), *map(str, args), "--out", str(one)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    res = subprocess.run([ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                          str(EVAL / "prompt_following.py"), *map(str, args), "--out", str(two)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "process 1 of 2" in res.stderr  # the second process generated its share
    names = sorted(p.name for p in (one / "images").glob("*.png"))
    assert names == [f"{i:06d}.png" for i in range(5)] == sorted(p.name for p in (two / "images").glob("*.png"))
    for name in names:
        a, b = (np.asarray(PILImage.open(d / "images" / name)) for d in (one, two))
        assert np.array_equal(a, b), name
    results = [json.loads((d / "results.json").read_text()) for d in (one, two)]
    assert results[0]["prompt_following"] == results[1]["prompt_following"]
