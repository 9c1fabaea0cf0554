"""FID with the standard Inception through clean-fid or torchmetrics, and FD-<name> for any other network.

Two backends, both standard and both deterministic for fixed inputs:
- ``"clean-fid"``: clean-fid's ``clean`` mode (PIL bicubic resize to 299 in float, then the NVIDIA
  TorchScript Inception ``inception-2015-12-05.pt``), its own feature loop and Fréchet distance.
- ``"torchmetrics"``: ``FrechetInceptionDistance`` over torch-fidelity's ``FeatureExtractorInceptionV3``
  (``weights-inception-2015-12-05-6726825d.pth``). We turn torchmetrics' antialiased resize off so the
  numbers match torch-fidelity and the original TensorFlow FID; clean-fid is the antialiased variant.

Neither library is allowed to download: ``require_inception`` finds the weights (an explicit path, or the
file already in the library's own cache) or raises ``MissingWeights`` before anything is generated.
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

Backend = Literal["clean-fid", "torchmetrics"]
BACKENDS: tuple[str, ...] = ("clean-fid", "torchmetrics")
ImageSource = str | Path | Sequence[str | Path]

# The files each library loads, and where it looks for them before downloading (read from their source:
# cleanfid/features.py + downloads_helper.py; torch_fidelity/feature_extractor_inceptionv3.py).
CLEANFID_FILE = "inception-2015-12-05.pt"
CLEANFID_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
FIDELITY_FILE = "weights-inception-2015-12-05-6726825d.pth"
FIDELITY_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{FIDELITY_FILE}"
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
TORCHMETRICS_ANTIALIAS = False  # torch-fidelity / TF1 bilinear resize: the reference FID numbers


def library_cache_path(backend: Backend) -> Path:
    """The exact file the backend's library checks before it would download the Inception weights."""
    if backend == "clean-fid":
        return Path("./" if platform.system() == "Windows" else "/tmp") / CLEANFID_FILE
    if backend == "torchmetrics":
        return Path(torch.hub.get_dir()) / "checkpoints" / FIDELITY_FILE  # $TORCH_HOME/hub/checkpoints
    raise ValueError(f"FID backend must be one of {BACKENDS}, got {backend!r}")


def require_inception(backend: Backend, inception_path: str | Path | None = None) -> Path:
    """Path of the Inception weights for ``backend``; raises ``MissingWeights`` if absent. Call it first."""
    cache = library_cache_path(backend)  # also validates `backend`
    if inception_path is not None:
        path = Path(inception_path).expanduser()
        if path.is_file():
            return path
        problem = f"--inception {inception_path}: no such file"
    elif cache.is_file():
        return cache
    else:
        problem = "no Inception weights given and none in the library cache"
    name, url = (CLEANFID_FILE, CLEANFID_URL) if backend == "clean-fid" else (FIDELITY_FILE, FIDELITY_URL)
    raise MissingWeights(
        f"FID ({backend} backend) needs the InceptionV3 weights file {name} ({problem}). "
        f"Download it from {url} and either place it at {cache} or pass its path with --inception PATH "
        f"(inception_path=...). Nothing is downloaded implicitly.")


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


class _CleanFIDBackend:
    """clean-fid ``clean`` mode with the TorchScript Inception loaded from a local file."""

    def __init__(self, weights: Path, batch_size: int, device: str) -> None:
        from cleanfid.inception_torchscript import InceptionV3W

        self.batch_size, self.device = batch_size, torch.device(device)
        if weights.name == CLEANFID_FILE:
            net = InceptionV3W(str(weights.parent), download=False, resize_inside=False)
        else:  # InceptionV3W only takes a folder holding the canonical name
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / CLEANFID_FILE).symlink_to(weights.resolve())
                net = InceptionV3W(tmp, download=False, resize_inside=False)
        self.net = net.to(self.device).eval()

    def features(self, paths: list[Path]) -> np.ndarray:
        from cleanfid.fid import get_files_features

        return get_files_features([str(p) for p in paths], self.net, num_workers=0, batch_size=self.batch_size,
                                  device=self.device, mode="clean", verbose=False)

    def score(self, gen_feats: np.ndarray, ref_feats: np.ndarray) -> float:
        from cleanfid.fid import fid_from_feats

        return float(fid_from_feats(gen_feats, ref_feats))


class InceptionFID:
    """FID of generated sets against one reference set, whose features are computed once.

    Scoring several checkpoints (or noise levels) against COCO-30K then costs only their own features.
    """

    def __init__(self, ref: ImageSource, backend: Backend = "clean-fid", inception_path: str | Path | None = None,
                 batch_size: int = 32, device: str = "cpu") -> None:
        require("cleanfid" if backend == "clean-fid" else "torch_fidelity", "eval")  # a missing extra: one line
        weights = require_inception(backend, inception_path)
        ref_paths = list_images(ref)
        _need_two(ref_paths, "reference")
        self.backend, self.batch_size, self.device = backend, batch_size, device
        if backend == "clean-fid":
            self._clean = _CleanFIDBackend(weights, batch_size, device)
            self._ref_feats = self._clean.features(ref_paths)
        else:
            from torchmetrics.image.fid import FrechetInceptionDistance

            self._metric = FrechetInceptionDistance(feature=2048, reset_real_features=False,
                                                    feature_extractor_weights_path=str(weights),
                                                    antialias=TORCHMETRICS_ANTIALIAS).to(device)
            self._update(ref_paths, real=True)

    @torch.no_grad()
    def features(self, source: ImageSource) -> np.ndarray:
        """(N, 2048) Inception features exactly as this backend computes them for FID (file order)."""
        paths = list_images(source)
        if self.backend == "clean-fid":
            return self._clean.features(paths)
        return extract_features(paths, self._metric.inception, self.batch_size, self.device)

    @torch.no_grad()
    def _update(self, paths: list[Path], real: bool) -> None:
        for batch in uint8_batches(paths, self.batch_size):
            self._metric.update(batch.to(self.device), real=real)

    def __call__(self, gen: ImageSource) -> float:
        gen_paths = list_images(gen)
        _need_two(gen_paths, "generated")
        if self.backend == "clean-fid":
            return self._clean.score(self._clean.features(gen_paths), self._ref_feats)
        self._metric.reset()  # keeps the reference statistics (reset_real_features=False)
        self._update(gen_paths, real=False)
        return float(self._metric.compute())


def compute_fid(gen: ImageSource, ref: ImageSource, backend: Backend = "clean-fid",
                inception_path: str | Path | None = None, batch_size: int = 32, device: str = "cpu") -> float:
    """Standard FID between two image folders (or lists of paths) with the chosen backend."""
    return InceptionFID(ref, backend, inception_path, batch_size, device)(gen)


class InceptionFeatures(FeatureNet):
    """torchmetrics' (torch-fidelity's) Inception as a ``FeatureNet``, so ``compute_fd`` with it is FID."""

    name = "inception"

    @property
    def metric_name(self) -> str:
        return "FID"  # the standard network and preprocessing: this distance is FID

    def __init__(self, inception_path: str | Path | None = None) -> None:
        super().__init__()
        NoTrainInceptionV3 = require("torchmetrics.image.fid", "eval").NoTrainInceptionV3

        weights = require_inception("torchmetrics", inception_path)
        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                      feature_extractor_weights_path=str(weights), antialias=TORCHMETRICS_ANTIALIAS)

    def forward(self, images_u8: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) uint8 -> (B, 2048)
        return self.net(images_u8)


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
    fid_from_feats = require("cleanfid.fid", "eval").fid_from_feats

    gen_paths, ref_paths = list_images(gen), list_images(ref)
    _need_two(gen_paths, "generated")
    _need_two(ref_paths, "reference")
    value = fid_from_feats(extract_features(gen_paths, extractor, batch_size, device),
                           extract_features(ref_paths, extractor, batch_size, device))
    return Score(extractor.metric_name, float(value))
