"""The image transform: a PIL image -> the (3, H, W) pixels an example trains on, a square crop at
``data.resolution`` or, with ``data.buckets``, a crop to the aspect-ratio bucket nearest the image's own."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image as PILImage

from ..config import ConfigError


def bucket_sizes(buckets) -> tuple[tuple[int, int], ...]:
    """``data.buckets`` as (height, width) int pairs; an entry may be ``[h, w]`` or ``"HxW"``. A malformed
    entry is a ``ConfigError`` naming it."""
    out = []
    for entry in buckets or ():
        pair = entry.lower().split("x") if isinstance(entry, str) else entry
        try:
            h, w = (int(v) for v in pair)
            ok = all(not isinstance(v, (bool, float)) for v in pair) and h >= 1 and w >= 1
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(f"data.buckets: bucket {entry!r} is not a (height, width) pair of positive ints "
                              f"(write [h, w] or \"HxW\")")
        out.append((h, w))
    return tuple(out)


def check_bucket_patches(buckets: tuple[tuple[int, int], ...], downsample: int, patch_size: int) -> None:
    """Every (height, width) bucket splits into whole patches of whole latent pixels: a ``ConfigError`` naming
    the first that does not (config_checks with the config's geometry, run_codec with the loaded codec's)."""
    unit = downsample * patch_size
    for h, w in buckets:
        if h % unit or w % unit:
            raise ConfigError(f"data.buckets: bucket [{h}, {w}] is not a multiple of {unit} px in both sides (the "
                              f"codec's downsampling {downsample} x model.patch_size={patch_size})")


def nearest_bucket(width: int, height: int, buckets: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The (height, width) bucket whose aspect ratio is closest to the image's, in log ratio (so 2:1 and 1:2
    are equally far from 1:1); ties go to the earlier bucket."""
    aspect = np.log(width / height)
    return min(buckets, key=lambda b: abs(np.log(b[1] / b[0]) - aspect))


class ImageTransform:
    """PIL image -> (3, H, W) float tensor in [0, 1]: RGB, resized (aspect kept) to cover the target, then a
    centre or random crop to it.

    The target is (R, R) (short side resized to R), or with ``buckets`` the (height, width) bucket nearest
    the image's aspect ratio (``nearest_bucket``), so a landscape photo stays landscape. Images that would
    need 2x upsampling or more return None: by default a side below half the target's plus one (an 8x8
    image at R=16), or a short side below an explicit ``min_side``; such images teach the model blur.
    The random crop draws from the given generator, so the pipeline's per-position generator makes crops
    reproducible.
    """

    def __init__(self, resolution: int, crop: str = "center", min_side: int | None = None, buckets=()):
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        if crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
        self.resolution, self.crop, self.buckets = resolution, crop, bucket_sizes(buckets)
        self.min_side = min_side

    def target(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) in pixels of the crop an image of this size gets."""
        return nearest_bucket(width, height, self.buckets) if self.buckets else (self.resolution, self.resolution)

    def __call__(self, image: PILImage.Image, generator: torch.Generator | None = None) -> torch.Tensor | None:
        image = image.convert("RGB")
        w, h = image.size
        th, tw = self.target(w, h)
        if (min(w, h) < self.min_side if self.min_side is not None else h < th // 2 + 1 or w < tw // 2 + 1):
            return None
        scale = max(th / h, tw / w)  # cover the target; without buckets, R / short side
        new_w, new_h = max(tw, round(w * scale)), max(th, round(h * scale))
        if (new_w, new_h) != (w, h):
            # bilinear, antialiased when shrinking: torchvision's Resize default and diffusers' training scripts
            image = image.resize((new_w, new_h), PILImage.Resampling.BILINEAR)
        if self.crop == "center":
            left, top = (new_w - tw) // 2, (new_h - th) // 2
        else:
            left = int(torch.randint(new_w - tw + 1, (1,), generator=generator))
            top = int(torch.randint(new_h - th + 1, (1,), generator=generator))
        image = image.crop((left, top, left + tw, top + th))
        # numpy, not torch: this runs per image in loader workers, where torch's thread pool only adds overhead
        pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)  # (3, H, W)
        return torch.from_numpy(np.ascontiguousarray(pixels))
