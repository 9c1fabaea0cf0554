"""Shared test setup: offline, temp caches, and the ../shared/assets folder when it exists."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_TMP = Path(tempfile.mkdtemp(prefix="tfm-tests-"))
for var, sub in (("TORCH_HOME", "torch"), ("MPLCONFIGDIR", "mpl"), ("TORCHINDUCTOR_CACHE_DIR", "inductor"),
                 ("HF_HOME", "hf"), ("TRANSFUSION_MOT_CACHE", "cache")):
    os.environ.setdefault(var, str(_TMP / sub))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("TFM_ASSETS", REPO.parent / "shared" / "assets"))


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    """../shared/assets, or skip: the real images, tokenizers and weights live outside the repo."""
    if not (ASSETS / "MANIFEST.md").exists():
        pytest.skip(f"shared assets not found at {ASSETS} (set TFM_ASSETS to their folder)")
    return ASSETS


def debug_overrides(out_dir, *extra: str) -> list[str]:
    """The debug config, quick: what the training, CLI and eval tests run."""
    return [f"train.out_dir={out_dir}", "train.ema_decay=0", "eval.n_prompts=4", "eval.val_examples=8",
            "eval.sample_steps=2", *extra]


@pytest.fixture(scope="session")
def debug_run(tmp_path_factory) -> Path:
    """One finished debug run (trained, exported, evaluated) shared by the generation and eval tests."""
    from transfusion_mot.config import load_config
    from transfusion_mot.train import train

    out = tmp_path_factory.mktemp("debug_run")
    cfg = load_config(str(REPO / "configs" / "debug.yaml"), debug_overrides(out, "train.steps=12"))
    return train(cfg)


# The main job's VAE settings at a sixth of its steps: ~25 s instead of 2 minutes of the suite's 5. The
# 600-step VAE's quality is measured by the main job itself (eval/results/main_job.json: ceiling 0.913).
MAIN_VAE_STEPS = "codec.vae_steps=100"


@pytest.fixture(scope="session")
def main_vae() -> Path:
    """The main job's VAE (configs/main.yaml, MAIN_VAE_STEPS), trained once per session into the session's
    cache dir (TRANSFUSION_MOT_CACHE); the main-job test then finds it there instead of training again."""
    from transfusion_mot.config import load_config
    from transfusion_mot.data.pipeline import train_codec_for

    return train_codec_for(load_config(str(REPO / "configs" / "main.yaml"), [MAIN_VAE_STEPS]))


@pytest.fixture(scope="session")
def debug_vae() -> Path:
    """The debug config's VAE, trained once per session into the session's cache. Training runs that are
    compared with each other take it first: a run that trains the VAE draws from the global RNG before the
    model's initialisation and a run that finds it cached does not, so they would start from different weights."""
    from transfusion_mot.config import load_config
    from transfusion_mot.data.pipeline import train_codec_for

    return train_codec_for(load_config(str(REPO / "configs" / "debug.yaml")))


def free_port() -> int:
    """A TCP port nobody listens on now, for one 2-process launch (others run such tests concurrently)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
