"""On-disk latents per example, so a second epoch (or a second run) does not run the encoder again.

One file per example key under ``<root>/<hash(data, codec, resolution[, buckets])>/``; each file keeps its
own (C, h, w), so images cropped to different aspect-ratio buckets share one cache. Writes go to a
temporary file and are moved into place with ``os.replace``, so several ranks writing the same key
race harmlessly and a killed process never leaves a half-written latent behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..config import CodecConfig

CACHE_ENV = "TRANSFUSION_MOT_CACHE"


def resolve_cache_dir(cache_dir: str | Path = CodecConfig.cache_dir) -> Path:
    """``$TRANSFUSION_MOT_CACHE`` overrides the default cache dir (tests point it at a temp dir)."""
    if str(cache_dir) == CodecConfig.cache_dir and os.environ.get(CACHE_ENV):
        cache_dir = os.environ[CACHE_ENV]
    return Path(cache_dir).expanduser()


class LatentCache:
    """Latents of one (data set, codec, resolution) triple, stored per example key. ``buckets`` (the
    ``data.buckets`` pairs) join the key when set, so another bucket list never reads these latents; without
    them the key is what it always was (caches made before buckets existed stay valid)."""

    def __init__(self, root: str | Path, data_name: str, codec_name: str, resolution: int, buckets=()):
        ident = {"data": data_name, "codec": codec_name, "resolution": int(resolution)}
        if buckets:
            ident["buckets"] = [[int(h), int(w)] for h, w in buckets]
        digest = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = resolve_cache_dir(root) / digest
        self.dir.mkdir(parents=True, exist_ok=True)
        info = self.dir / "cache.json"  # human-readable record of what the hash stands for
        if not info.exists():
            _atomic_write(info, lambda f: f.write(json.dumps(ident, indent=1).encode()))

    def _path(self, key: str) -> Path:
        # Keys are arbitrary strings (file names, urls): hash them into a safe, fixed-length file name.
        h = hashlib.sha1(key.encode()).hexdigest()
        return self.dir / h[:2] / f"{h}.pt"

    def get(self, keys: Sequence[str]) -> list[torch.Tensor | None]:
        """The stored (C, h, w) latent of each key, or None where it is missing or unreadable."""
        out: list[torch.Tensor | None] = []
        for key in keys:
            path = self._path(key)
            try:
                out.append(torch.load(path, map_location="cpu", weights_only=True))
            except FileNotFoundError:
                out.append(None)
            except Exception:  # a truncated or corrupt file (any unpickling error) is a miss: re-encode it
                out.append(None)
        return out

    def put(self, keys: Sequence[str], latents: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Store one (C, h, w) latent per key (float32 on CPU, detached from any graph)."""
        if len(keys) != len(latents):
            raise ValueError(f"put: {len(keys)} keys but {len(latents)} latents")
        for key, lat in zip(keys, latents):
            path = self._path(key)
            path.parent.mkdir(exist_ok=True)
            tensor = lat.detach().to("cpu", torch.float32).clone()  # clone: do not save the whole batch's storage
            _atomic_write(path, lambda f, t=tensor: torch.save(t, f))


class CachedEncoder:
    """``encode(keys, pixels) -> (N, C, h, w)`` latents that runs the codec only on cache misses.

    Latents come back float32 on the CPU either way, where packing happens, so a hit and a miss look alike.
    """

    def __init__(self, codec: Callable | torch.nn.Module, cache: LatentCache | None = None):
        self.codec, self.cache = codec, cache
        self.hits = self.misses = 0

    def __call__(self, keys: Sequence[str], pixels: torch.Tensor) -> torch.Tensor:
        return self.encode(keys, pixels)

    def encode(self, keys: Sequence[str], pixels: torch.Tensor) -> torch.Tensor:
        if len(keys) != len(pixels):
            raise ValueError(f"encode: {len(keys)} keys but {len(pixels)} images")
        if self.cache is None:
            self.misses += len(keys)
            return self.codec.encode(pixels).to("cpu", torch.float32)
        found = self.cache.get(keys)
        todo = [i for i, lat in enumerate(found) if lat is None]
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        if todo:
            fresh = self.codec.encode(pixels[todo])  # (M, C, h, w)
            self.cache.put([keys[i] for i in todo], fresh)
            for i, lat in zip(todo, fresh):
                found[i] = lat.to("cpu", torch.float32)
        return torch.stack(found)  # type: ignore[arg-type]


def _atomic_write(path: Path, write: Callable) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
