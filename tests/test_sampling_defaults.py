"""A run's own config is the default of everything its sampler does (issue 18.5): `generate` (CLI and
API) takes steps, CFG, scheduler, flow.shift, seed and images per prompt from it; captioning takes
sample.temperature / top_k / top_p / max_new_tokens. Arguments override it."""
import json
import shutil

import pytest
import torch

from transfusion_mot import from_pretrained, sample

RUN_SAMPLING = {"steps": 3, "cfg_scale": 2.5, "seed": 7, "n_per_prompt": 2, "max_new_tokens": 1, "temperature": 0.7,
                "top_k": 5, "top_p": 0.9}


@pytest.fixture(scope="module")
def tuned_run(debug_run, tmp_path_factory):
    """The debug run with its own sampling settings written into its exported config."""
    run = tmp_path_factory.mktemp("tuned") / "run"
    shutil.copytree(debug_run / "model", run / "model")
    shutil.copytree(debug_run / "vae", run / "vae")
    path = run / "model" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["sample"].update(RUN_SAMPLING)
    cfg["flow"]["shift"] = 3.0
    path.write_text(json.dumps(cfg))
    return run


def test_api_generate_defaults_to_the_runs_config(tuned_run):
    pipe = from_pretrained(tuned_run)
    ids = pipe.encode_prompts(["a red circle"])
    want = sample.generate_images(pipe.model, ids, pipe.specials, steps=3, cfg_scale=2.5, seed=7, n_per_prompt=2,
                                  shift=3.0)
    got = pipe.generate(["a red circle"])
    assert got.shape[0] == 2
    torch.testing.assert_close(got, pipe.codec.decode(want).float().clamp(0, 1))
    unshifted = pipe.generate(["a red circle"], shift=1.0)  # an argument overrides the run's value
    assert (unshifted - got).abs().max() > 1e-4
    assert torch.equal(pipe.generate(["a red circle"], cfg_scale=2.5, steps=3, seed=7, n=2, shift=3.0), got)


def test_cli_generate_defaults_to_the_runs_config(tuned_run, tmp_path):
    from PIL import Image as PILImage
    from torchvision.transforms.functional import pil_to_tensor

    from transfusion_mot import cli

    out = tmp_path / "gen"
    cli.main(["generate", "--ckpt", str(tuned_run), "--prompt", "a red circle", "--out", str(out)])
    assert sorted(p.name for p in out.glob("*.png")) == ["0000_0.png", "0000_1.png", "grid.png"]  # n_per_prompt=2
    expected = (from_pretrained(tuned_run).generate(["a red circle"]) * 255).round().to(torch.uint8)
    assert torch.equal(pil_to_tensor(PILImage.open(out / "0000_1.png").convert("RGB")), expected[1])


def test_caption_defaults_to_the_runs_sample_settings(tuned_run, monkeypatch):
    pipe = from_pretrained(tuned_run)
    images = pipe.generate(["a red circle", "two blue squares"], n=1)
    assert all(len(c) <= 1 for c in pipe.caption(images))  # sample.max_new_tokens=1 (bytes tokenizer)
    seen = []
    real = sample.caption_images
    monkeypatch.setattr(sample, "caption_images", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    pipe.caption(images)
    pipe.caption(images, temperature=0.0, max_new_tokens=8)  # arguments win
    assert seen[0] == {"seed": 7, "temperature": 0.7, "top_k": 5, "top_p": 0.9, "max_new_tokens": 1}
    assert seen[1] == {**seen[0], "temperature": 0.0, "max_new_tokens": 8}
