"""Dependencies by use (issue 22 #6): training, evaluation at the end of a run, the exported folder,
generation and captioning run on the core install; a feature whose extra is missing names the extra."""
from __future__ import annotations

import sys

import pytest
from conftest import REPO, debug_overrides

EXTRAS = {"cleanfid": "eval", "torchmetrics": "eval", "pycocoevalcap": "eval",
          "datasets": "data", "fastapi": "demo", "uvicorn": "demo"}


@pytest.fixture
def without_extras(monkeypatch):
    """Every package of the extras unimportable (``import x`` raises ImportError), as on a core install."""
    for name in list(sys.modules):
        if name.split(".")[0] in EXTRAS:
            monkeypatch.setitem(sys.modules, name, None)
    for name in EXTRAS:
        monkeypatch.setitem(sys.modules, name, None)


def test_core_install_trains_evaluates_exports_generates_and_captions(tmp_path, debug_vae, without_extras):
    from transfusion_mot import from_pretrained
    from transfusion_mot.config import load_config
    from transfusion_mot.train import train

    cfg = load_config(str(REPO / "configs" / "debug.yaml"),
                      debug_overrides(tmp_path / "run", "train.steps=2", "train.log_every=1", "eval.n_prompts=2"))
    run = train(cfg)
    assert (run / "results.json").is_file() and (run / "model" / "README.md").is_file()
    pipe = from_pretrained(run / "model")
    images = pipe("a red circle", num_inference_steps=2, output_type="pt")
    assert len(pipe.caption(images, max_new_tokens=4)) == 1


def test_a_missing_extra_is_named(without_extras):
    from transfusion_mot.data.sources import HFSource
    from transfusion_mot.metrics.cider import cider
    from transfusion_mot.metrics.clip_score import clip_score

    with pytest.raises(ImportError, match=r"pycocoevalcap is not installed: it comes with the \[eval\] extra"):
        cider({0: ["a red circle"]}, {0: "a red circle"})
    with pytest.raises(ImportError, match=r"torchmetrics is not installed: it comes with the \[eval\] extra"):
        import torch

        clip_score(torch.zeros(1, 3, 8, 8), ["x"])
    with pytest.raises(ImportError, match=r"datasets is not installed: it comes with the \[data\] extra"):
        HFSource("some/dataset")
