"""Shared test setup: offline, temp caches, and the ../shared/assets folder when it exists."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_TMP = Path(tempfile.mkdtemp(prefix="tfm-tests-"))
for var, sub in (("TORCH_HOME", "torch"), ("MPLCONFIGDIR", "mpl"), ("TORCHINDUCTOR_CACHE_DIR", "inductor"),
                 ("HF_HOME", "hf")):
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
