"""FID with the standard Inception through clean-fid, and FD-<name> for any other network.

One library, one weights file (the NVIDIA TorchScript Inception ``inception-2015-12-05.pt``), two of
clean-fid's modes, both deterministic for fixed inputs:
- ``"clean"`` (default; ``"clean-fid"`` is its old name): PIL bicubic resize to 299 in float outside the
  network, clean-fid's own feature loop.
- ``"legacy_tensorflow"``: the TF-style bilinear resize inside the TorchScript network
  (``InceptionV3W(resize_inside=True)``): the numbers the original TensorFlow FID and most papers report.
Both score with clean-fid's Fréchet distance.

clean-fid is not allowed to download: ``require_inception`` finds the weights (an explicit path, or the file
already in clean-fid's own cache) or raises ``MissingWeights`` before anything is generated.
A different feature network is reported as ``FD-<name>`` (``compute_fd``), never as FID.
"""
from __future__ import annotations

import platform
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from ..extras import require
from . import MissingWeights, Score
from .features import FeatureNet

Backend = Literal["clean", "legacy_tensorflow", "clean-fid"]
BACKENDS: tuple[str, ...] = ("clean", "legacy_tensorflow")
BACKEND_ALIASES = {"clean-fid": "clean"}  # the name of the clean mode before legacy_tensorflow joined it
ImageSource = str | Path | Sequence[str | Path]

# The file clean-fid loads and where it looks before downloading (cleanfid/features.py, downloads_helper.py).
CLEANFID_FILE = "inception-2015-12-05.pt"
CLEANFID_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def fid_mode(backend: str) -> str:
    """clean-fid's mode for a ``--backend`` value (aliases resolved); a ValueError names the choices."""
    mode = BACKEND_ALIASES.get(backend, backend)
    if mode not in BACKENDS:
        raise ValueError(f"FID backend must be one of {BACKENDS} (or {', '.join(BACKEND_ALIASES)}), got {backend!r}")
    return mode


def library_cache_path() -> Path:
    """The exact file clean-fid checks before it would download the Inception weights (both modes)."""
    return Path("./" if platform.system() == "Windows" else "/tmp") / CLEANFID_FILE


def require_inception(backend: Backend = "clean", inception_path: str | Path | None = None) -> Path:
    """Path of the Inception weights; raises ``MissingWeights`` if absent (ValueError: bad backend). Call it first."""
    mode = fid_mode(backend)
    cache = library_cache_path()
    if inception_path is not None:
        path = Path(inception_path).expanduser()
        if path.is_file():
            return path
        problem = f"--inception {inception_path}: no such file"
    elif cache.is_file():
        return cache
    else:
        problem = "no Inception weights given and none in clean-fid's cache"
    raise MissingWeights(
        f"FID (clean-fid, {mode} mode) needs the InceptionV3 weights file {CLEANFID_FILE} ({problem}). "
        f"Download it from {CLEANFID_URL} and either place it at {cache} or pass its path with --inception PATH "
        f"(inception_path=...). Nothing is downloaded implicitly.")


def load_inception(weights: Path, resize_inside: bool) -> torch.nn.Module:
    """clean-fid's ``InceptionV3W`` over a local TorchScript file, whatever its name (never downloads)."""
    from cleanfid.inception_torchscript import InceptionV3W

    if weights.name == CLEANFID_FILE:
        return InceptionV3W(str(weights.parent), download=False, resize_inside=resize_inside).eval()
    with tempfile.TemporaryDirectory() as tmp:  # InceptionV3W only takes a folder holding the canonical name
        (Path(tmp) / CLEANFID_FILE).symlink_to(Path(weights).resolve())
        return InceptionV3W(tmp, download=False, resize_inside=resize_inside).eval()


def frechet_distance(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """clean-fid's Fréchet distance of two (N, D) feature sets, its matrix square root on varying dims only.

    A dimension constant in both sets has zero rows and columns in both covariances, so its block of the
    square root is zero: dropping it from the covariance term (its means still count) leaves the distance
    unchanged and spares scipy's sqrtm a D x D problem where most dims are dead (ReLU features, test nets).
    """
    frechet = require("cleanfid.fid", "eval").frechet_distance

    f1, f2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    live = (np.ptp(f1, axis=0) > 0) | (np.ptp(f2, axis=0) > 0)  # (D,)
    mu1, mu2 = f1.mean(axis=0), f2.mean(axis=0)
    dead_mean = float(np.sum((mu1[~live] - mu2[~live]) ** 2))
    if not live.any():
        return dead_mean
    f1, f2 = f1[:, live], f2[:, live]
    sig1, sig2 = np.atleast_2d(np.cov(f1, rowvar=False)), np.atleast_2d(np.cov(f2, rowvar=False))
    return float(frechet(mu1[live], sig1, mu2[live], sig2)) + dead_mean


def list_images(source: ImageSource) -> list[Path]:
    """Image files of a folder (recursive, sorted) or an explicit list, checked to exist."""
    if isinstance(source, (str, Path)):
        folder = Path(source)
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder {folder} does not exist")
        paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not paths:
            raise ValueError(f"image folder {folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        return paths
    paths = [Path(p) for p in source]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image file(s) not found, first: {missing[0]}")
    if not paths:
        raise ValueError("empty image list")
    return paths


def _need_two(paths: list[Path], role: str) -> None:
    if len(paths) < 2:
        raise ValueError(f"{role} set has {len(paths)} image(s); a Fréchet distance needs at least 2")


def uint8_batches(paths: list[Path], batch_size: int) -> Iterator[torch.Tensor]:
    """RGB uint8 batches (B, 3, H, W) in file order; a batch only holds images of one size."""
    batch: list[torch.Tensor] = []
    for path in paths:
        with Image.open(path) as im:
            img = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)  # (3, H, W)
        if batch and (len(batch) == batch_size or batch[0].shape != img.shape):
            yield torch.stack(batch)
            batch = []
        batch.append(img)
    if batch:
        yield torch.stack(batch)


class InceptionFID:
    """FID of generated sets against one reference set, whose features are computed once.

    Scoring several checkpoints (or noise levels) against COCO-30K then costs only their own features.
    """

    def __init__(self, ref: ImageSource, backend: Backend = "clean", inception_path: str | Path | None = None,
                 batch_size: int = 32, device: str = "cpu") -> None:
        self.mode = fid_mode(backend)
        require("cleanfid", "eval")  # a missing extra: one line
        weights = require_inception(self.mode, inception_path)
        ref_paths = list_images(ref)
        _need_two(ref_paths, "reference")
        self.batch_size, self.device = batch_size, device
        if self.mode == "clean":
            self.net = load_inception(weights, resize_inside=False).to(device)
        else:  # resize inside the network: our batching groups images by size, so mixed sizes work
            self.net = InceptionFeatures(weights)
        self._ref_feats = self._features(ref_paths)

    @torch.no_grad()
    def _features(self, paths: list[Path]) -> np.ndarray:
        if self.mode == "clean":
            from cleanfid.fid import get_files_features

            return get_files_features([str(p) for p in paths], self.net, num_workers=0, batch_size=self.batch_size,
                                      device=torch.device(self.device), mode="clean", verbose=False)
        return extract_features(paths, self.net, self.batch_size, self.device)

    def features(self, source: ImageSource) -> np.ndarray:
        """(N, 2048) Inception features exactly as this mode computes them for FID (file order)."""
        return self._features(list_images(source))

    def __call__(self, gen: ImageSource) -> float:
        gen_paths = list_images(gen)
        _need_two(gen_paths, "generated")
        return frechet_distance(self._features(gen_paths), self._ref_feats)


def compute_fid(gen: ImageSource, ref: ImageSource, backend: Backend = "clean",
                inception_path: str | Path | None = None, batch_size: int = 32, device: str = "cpu") -> float:
    """Standard FID between two image folders (or lists of paths) in the chosen clean-fid mode."""
    return InceptionFID(ref, backend, inception_path, batch_size, device)(gen)


class InceptionFeatures(FeatureNet):
    """clean-fid's TorchScript Inception, TF-style resize inside, as a ``FeatureNet``: ``compute_fd`` with it is FID
    (clean-fid's legacy_tensorflow mode)."""

    name = "inception"

    @property
    def metric_name(self) -> str:
        return "FID"  # the standard network and preprocessing: this distance is FID

    def __init__(self, inception_path: str | Path | None = None) -> None:
        super().__init__()
        require("cleanfid", "eval")
        self.net = load_inception(require_inception("legacy_tensorflow", inception_path), resize_inside=True)

    def forward(self, images_u8: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) uint8 -> (B, 2048)
        return self.net(images_u8.float())  # clean-fid feeds 0..255 floats; the network resizes and normalises


@torch.no_grad()
def extract_features(paths: list[Path], extractor: torch.nn.Module, batch_size: int = 32,
                     device: str = "cpu") -> np.ndarray:
    """(N, D) float64 features of the images, in file order."""
    extractor = extractor.to(device).eval()
    feats = [extractor(batch.to(device)).double().cpu() for batch in uint8_batches(paths, batch_size)]
    return torch.cat(feats).numpy()


def compute_fd(gen: ImageSource, ref: ImageSource, extractor: FeatureNet, batch_size: int = 32,
               device: str = "cpu") -> Score:
    """Fréchet distance in ``extractor``'s feature space, named ``extractor.metric_name`` (``FD-<name>``)."""
    require("cleanfid", "eval")  # its Fréchet distance; a missing extra: one line, before any work
    gen_paths, ref_paths = list_images(gen), list_images(ref)
    _need_two(gen_paths, "generated")
    _need_two(ref_paths, "reference")
    value = frechet_distance(extract_features(gen_paths, extractor, batch_size, device),
                             extract_features(ref_paths, extractor, batch_size, device))
    return Score(extractor.metric_name, float(value))
