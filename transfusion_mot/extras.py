"""Optional dependencies by use (pyproject's extras): ``[eval]`` (FID, CLIP score, CIDEr), ``[data]`` (Hugging
Face ``datasets`` sources), ``[demo]`` (``transfusion-mot demo``: fastapi, uvicorn); ``[dev]`` is all of them
plus the test tools. Training, generation, captioning and the main job need only the core install; a feature
whose extra is missing says which one to install."""
from __future__ import annotations

import importlib


def require(module: str, extra: str):
    """``import module``, or an ImportError naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{module.split('.')[0]} is not installed: it comes with the [{extra}] extra "
                          f"(pip install 'transfusion_mot[{extra}]', or -e '.[{extra}]' in a checkout)") from e
