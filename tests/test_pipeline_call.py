"""The diffusers-style call (issue 22 #2): ``pipe(prompt | list, negative_prompt=, num_inference_steps=,
guidance_scale=, num_images_per_prompt=, generator=, output_type=)``, interleaved generation from the API
and ``transfusion-mot generate --interleaved``."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from transfusion_mot import from_pretrained

CLI = str(Path(sys.executable).with_name("transfusion-mot"))
QUICK = dict(num_inference_steps=3, guidance_scale=2.0)


@pytest.fixture(scope="module")
def pipe(debug_run):
    return from_pretrained(debug_run, device="cpu")


def test_a_str_prompt_is_one_prompt_and_gives_one_pil_image(pipe):
    images = pipe("a red circle", **QUICK)
    assert len(images) == 1 and isinstance(images[0], PILImage.Image) and images[0].size == (32, 32)
    assert images[0].mode == "RGB"
    assert pipe.generate("red", steps=2).shape[0] == 1  # not three prompts "r", "e", "d"


def test_two_prompts_two_images_each_give_four(pipe):
    images = pipe(["a red circle", "a blue square"], num_images_per_prompt=2, **QUICK)
    assert len(images) == 4 and all(isinstance(im, PILImage.Image) for im in images)


def test_defaults_are_the_runs_and_output_types(pipe):
    """None arguments take the run's sample.* (what generate does): same images as generate's."""
    pt = pipe("a red circle", output_type="pt", **QUICK)
    ref = pipe.generate(["a red circle"], steps=3, cfg_scale=2.0)  # seed: the run's sample.seed
    assert torch.equal(pt, ref)
    arr = pipe("a red circle", output_type="np", **QUICK)
    assert isinstance(arr, np.ndarray) and arr.shape == (1, 32, 32, 3)
    assert np.allclose(arr[0], pt[0].permute(1, 2, 0).numpy())
    pil = pipe("a red circle", **QUICK)[0]
    assert np.array_equal(np.asarray(pil), (arr[0] * 255).round().astype("uint8"))
    with pytest.raises(ValueError, match="output_type='latent'"):
        pipe("a red circle", output_type="latent")
    with pytest.raises(ValueError, match="prompt 1 is a int"):
        pipe(["a red circle", 3])


def test_same_generator_seed_same_images_and_per_image_generators(pipe):
    a = pipe(["a red circle", "a blue square"], generator=torch.Generator().manual_seed(3), output_type="pt", **QUICK)
    b = pipe(["a red circle", "a blue square"], generator=torch.Generator().manual_seed(3), output_type="pt", **QUICK)
    c = pipe(["a red circle", "a blue square"], generator=torch.Generator().manual_seed(4), output_type="pt", **QUICK)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # one generator per image: an image depends on its own generator only, not on the batch around it
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    pair = pipe(["a red circle", "a blue square"], generator=gens(5, 6), output_type="pt", batch_size=2, **QUICK)
    alone = pipe("a blue square", generator=gens(6), output_type="pt", **QUICK)
    assert torch.allclose(pair[1], alone[0], atol=1e-5)
    with pytest.raises(ValueError, match="1 generators for 2 images"):
        pipe(["a", "b"], generator=gens(1))


def test_negative_prompt_is_the_unconditional_context(pipe):
    """A negative prompt changes the image; an empty one is the default unconditional ``BOS BOI``. At
    guidance 0 only the unconditional branch is left, so prompt P with negative N is N's own image at guidance 1."""
    base = pipe("a red circle", output_type="pt", **QUICK)
    neg = pipe("a red circle", negative_prompt="a blue square", output_type="pt", **QUICK)
    empty = pipe("a red circle", negative_prompt="", output_type="pt", **QUICK)
    assert (base - neg).abs().max() > 1e-5  # (the 12-step debug model barely reads its prompt)
    assert torch.allclose(base, empty, atol=1e-5)
    only_negative = pipe("a red circle", negative_prompt="a blue square", output_type="pt", num_inference_steps=3,
                         guidance_scale=0.0)
    negative_itself = pipe("a blue square", output_type="pt", num_inference_steps=3, guidance_scale=1.0)
    unconditional = pipe("a red circle", output_type="pt", num_inference_steps=3, guidance_scale=0.0)
    assert torch.allclose(only_negative, negative_itself, atol=1e-5)
    assert not torch.allclose(only_negative, unconditional, atol=1e-6)
    both = pipe(["a red circle", "a green star"], negative_prompt=["a blue square", ""], output_type="pt", **QUICK)
    assert torch.allclose(both[0], neg[0], atol=1e-5)
    with pytest.raises(ValueError, match="2 negative prompts for 3 prompts"):
        pipe(["a", "b", "c"], negative_prompt=["x", "y"])


def test_interleave_returns_text_and_images_in_order(pipe):
    parts = pipe.interleave("a red circle", start_with_image=True, max_images=1, max_new_tokens=6,
                            num_inference_steps=2)
    assert parts[0] == "a red circle" and isinstance(parts[1], PILImage.Image)  # the whole document, in order
    assert all(isinstance(p, (str, PILImage.Image)) for p in parts)
    assert sum(isinstance(p, PILImage.Image) for p in parts) == 1


def test_generate_interleaved_cli_writes_documents(debug_run, tmp_path):
    out = tmp_path / "docs"
    res = subprocess.run([CLI, "generate", "--ckpt", str(debug_run), "--interleaved", "--prompt", "a red circle",
                          "--prompt", "two stars", "--steps", "2", "--max-new-tokens", "8", "--start-with-image",
                          "--out", str(out)],
                         capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (out / "0000.md").read_text().startswith("a red circle\n\n![image 0](0000_0.png)")
    assert (out / "0001.md").is_file() and (out / "0000_0.png").is_file() and (out / "0001_0.png").is_file()
    for doc in ("0000.md", "0001.md"):
        for line in (out / doc).read_text().splitlines():
            if line.startswith("!["):
                assert (out / line.split("(")[1].rstrip(")")).is_file()
    again = subprocess.run([CLI, "generate", "--ckpt", str(debug_run), "--interleaved", "--prompt", "x",
                            "--out", str(out)], capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert again.returncode != 0 and "--overwrite" in again.stderr  # an earlier document is never overwritten silently
