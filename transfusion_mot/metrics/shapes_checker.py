"""The shapes prompt-following checker (DESIGN §4): which facts of a caption hold in an image.

The generator (``data/shapes.py``) knows the truth of every scene, so this checker reads any image -- a
real one or a generated one -- and says which facts of a caption in the shapes grammar hold (colour,
shape, count, size and the relation) without a pretrained model: saturated pixels are segmented by hue
into blobs, each blob classified by its fill and corner harmonics. ``held_out_prompts`` are the prompts a
model is scored on; ``chance_score`` and ``reconstruction_score`` are the floor and the codec's ceiling.
It is an evaluation, not data: nothing in ``data/`` imports it.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from ..data.shapes import (_NUMBERS, COLOURS, RELATIONS, SHAPES, SIZES, Caption, Group, Scene, caption, make_scene,
                           render, split_seed)

# ------------------------------------------------------------------------------------------------ captions
_GROUP_RE = (rf"({'|'.join(_NUMBERS)}) (?:({'|'.join(SIZES)}) )?({'|'.join(COLOURS)}) "
             rf"({'|'.join(SHAPES)})(s?)")
_CAPTION_RE = re.compile(rf"{_GROUP_RE}(?: ({'|'.join(RELATIONS)}) {_GROUP_RE})?")


def parse_caption(text: str) -> Caption:
    """Groups and relation of a caption in the grammar; ValueError naming the text otherwise."""
    norm = " ".join(str(text).lower().replace(".", " ").split())
    m = _CAPTION_RE.fullmatch(norm)
    if m is None:
        raise ValueError(f"caption {text!r} is not in the shapes grammar "
                         f"(e.g. 'two small green triangles above a large red circle')")
    parts = m.groups()
    groups = []
    for number, size, colour, kind, plural in (parts[0:5], parts[6:11]):
        if number is None:
            continue
        count = _NUMBERS[number]
        if (count > 1) != bool(plural):
            raise ValueError(f"caption {text!r}: '{number} ... {kind}{plural}' mixes singular and plural")
        groups.append(Group(count, colour, kind, size))
    if len(groups) == 2 and groups[0].colour == groups[1].colour:
        raise ValueError(f"caption {text!r}: the two groups must differ in colour")
    return Caption(groups, parts[5])


# ------------------------------------------------------------------------------------------------- checker

_CHROMA_MIN = 0.3  # max - min of RGB in [0, 1]: palette >= 0.6, backgrounds <= 0.15
_MIN_AREA = 0.004  # blobs smaller than this fraction of the image are specks
_MIN_FILL = 0.25  # blobs filling less of their box are noise strands (every shape fills >= 0.4)
_SIZE_SPLIT = 0.255  # box side (image widths) between small (~0.19) and large (~0.32)
_RELATION_MARGIN = 0.06  # checker: centroids this far apart on the axis (lenient: generated images)


def _hue(rgb: np.ndarray) -> np.ndarray:
    """Opponent-axis hue in radians: smooth, and unchanged by mixing with grey (antialiased edges)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.arctan2(math.sqrt(3) * (g - b), 2 * r - g - b)


_PALETTE_NAMES = list(COLOURS)
_PALETTE_HUES = _hue(np.array([COLOURS[c] for c in _PALETTE_NAMES], np.float32) / 255.0)  # (K,)


@dataclass
class Blob:
    area: float  # fraction of the image
    cx: float  # centroid, [0, 1]
    cy: float
    extent: float  # longer box side, image widths
    kind: str


@dataclass
class CheckResult:
    facts: dict[str, bool]
    score: float  # fraction of facts that hold


def _as_array(image) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1] from a (3, H, W) tensor in [0, 1], a PIL image or an (H, W, 3) array."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensor of shape {tuple(image.shape)}: expected (3, H, W) in [0, 1]")
        return image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image array of shape {arr.shape}: expected (H, W, 3)")
    return arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else np.clip(arr.astype(np.float32), 0, 1)


def segment(image) -> np.ndarray:
    """(H, W) palette index of every saturated pixel (nearest hue), -1 for background."""
    rgb = _as_array(image)
    chroma = rgb.max(axis=2) - rgb.min(axis=2)  # (H, W)
    diff = np.abs(_hue(rgb)[..., None] - _PALETTE_HUES)  # (H, W, K)
    nearest = np.minimum(diff, 2 * math.pi - diff).argmin(axis=2)  # (H, W)
    return np.where(chroma > _CHROMA_MIN, nearest, -1).astype(np.int8)


def find_blobs(image, colour: str, classes: np.ndarray | None = None) -> list[Blob]:
    """Connected regions of ``colour`` (``classes``: a ``segment`` map already computed).

    Specks are dropped three ways, so noise never passes for a shape: too small, too sparse for their
    box, or without a solid core (a pixel whose 3x3 neighbourhood is all the colour).
    """
    if colour not in COLOURS:
        raise ValueError(f"colour {colour!r}: expected one of {list(COLOURS)}")
    classes = segment(image) if classes is None else classes
    h, w = classes.shape
    mask = classes == _PALETTE_NAMES.index(colour)  # (H, W)
    core = ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool))
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), bool))
    blobs = []
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        region = labels[box] == index  # (bh, bw)
        area = int(region.sum())
        bh, bw = region.shape
        if area < _MIN_AREA * h * w or area < _MIN_FILL * bh * bw or not core[box][region].any():
            continue
        ys, xs = np.nonzero(region)
        blobs.append(Blob(area / (h * w), (box[1].start + xs.mean() + 0.5) / w, (box[0].start + ys.mean() + 0.5) / h,
                          max(bh / h, bw / w), classify(region)))
    return blobs


def shape_features(region: np.ndarray) -> tuple[float, float, float, float]:
    """(fill, h3, h4, h5) of a blob (boolean mask cropped to its box).

    fill is the area over the box area (square ~1, circle ~0.79, triangle ~0.53, star ~0.46). h_m is the
    m-th angular harmonic of the mass around the centroid, weighted by squared radius: a cue for m-fold
    corners (triangle h3 ~0.5, square h4 ~0.28, star h5 ~0.5, circle all ~0). Blur shrinks harmonics
    gently, so they tell a blurred star from a circle where fill alone cannot.
    """
    ys, xs = np.nonzero(region)
    z = (xs - xs.mean()) + 1j * (ys - ys.mean())  # (n,) offsets from the centroid
    weight = np.abs(z) ** 2
    total = max(float(weight.sum()), 1e-9)
    turns = z / np.maximum(np.abs(z), 1e-9)  # e^{i theta}
    h3, h4, h5 = (float(np.abs((weight * turns ** m).sum())) / total for m in (3, 4, 5))
    return region.sum() / region.size, h3, h4, h5


def classify(region: np.ndarray) -> str:
    """The shape of one blob, from its dominant corner harmonic, with fill to separate square and circle."""
    fill, h3, h4, h5 = shape_features(region)
    if h3 >= 0.25 and h3 >= h5:
        return "triangle"
    if h5 >= 0.14 and h5 >= h4:
        return "star"
    if fill >= 0.87 or h4 >= 0.17:
        return "square"
    return "circle"


def check(image, text: str) -> CheckResult:
    """Which facts of caption ``text`` hold in ``image``; score = the fraction that do."""
    parsed = parse_caption(text)
    facts: dict[str, bool] = {}
    found = []
    classes = segment(image)
    for i, group in enumerate(parsed.groups):
        blobs = find_blobs(image, group.colour, classes)
        found.append(blobs)
        n = len(blobs)
        facts[f"g{i}.colour"] = n > 0
        facts[f"g{i}.shape"] = n > 0 and 2 * sum(b.kind == group.kind for b in blobs) >= n
        facts[f"g{i}.count"] = n == group.count
        if group.size is not None:
            facts[f"g{i}.size"] = n > 0 and 2 * sum(_size_of(b) == group.size for b in blobs) >= n
    if parsed.relation is not None:
        facts["relation"] = all(found) and _relation_holds(found[0], found[1], parsed.relation)
    return CheckResult(facts, sum(facts.values()) / len(facts))


def _size_of(blob: Blob) -> str:
    return "large" if blob.extent >= _SIZE_SPLIT else "small"


def _relation_holds(a: list[Blob], b: list[Blob], relation: str) -> bool:
    dx = np.mean([s.cx for s in b]) - np.mean([s.cx for s in a])
    dy = np.mean([s.cy for s in b]) - np.mean([s.cy for s in a])
    along = {"above": dy, "below": -dy, "left of": dx, "right of": -dx}[relation]
    return bool(along >= _RELATION_MARGIN)


def prompt_following_score(images: Iterable, prompts: Iterable[str]) -> float:
    """Mean checker score of images (a (N, 3, H, W) tensor or a sequence) against their prompts."""
    images, prompts = list(images), list(prompts)
    if len(images) != len(prompts) or not images:
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts: need as many, and at least one")
    return float(np.mean([check(img, p).score for img, p in zip(images, prompts)]))


# ------------------------------------------------------------------------------------- held-out prompts


def held_out_scenes(n: int, split: str = "test", max_shapes: int = 4, textured: bool = True) -> list[Scene]:
    """The first ``n`` scenes of ``split`` (the same scenes the data set serves as its items 0..n-1)."""
    return [make_scene(split_seed(split, i), max_shapes, textured) for i in range(n)]


def held_out_prompts(n: int, split: str = "test", max_shapes: int = 4) -> list[str]:
    """Captions of the first ``n`` scenes of ``split``: the prompts a model is scored on."""
    return [caption(s) for s in held_out_scenes(n, split, max_shapes)]


@functools.lru_cache(maxsize=8)
def chance_score(n: int = 128, resolution: int = 64, max_shapes: int = 4) -> float:
    """What ignoring the prompt scores: real test image i checked against the caption of image i + 1."""
    scenes = held_out_scenes(n, max_shapes=max_shapes)
    images = [render(s, resolution) for s in scenes]
    prompts = [caption(scenes[(i + 1) % n]) for i in range(n)]
    return prompt_following_score(images, prompts)


def reconstruction_score(roundtrip: Callable[[torch.Tensor], torch.Tensor], n: int = 64, resolution: int = 64,
                         max_shapes: int = 4, textured: bool = True) -> float:
    """What an image codec leaves of the task: the first ``n`` real test scenes (whose captions are the
    held-out prompts) passed through ``roundtrip`` ((N, 3, H, W) in [0, 1] -> the same, e.g. a VAE's
    encode + decode) and checked against their own captions. A model decoding through that codec cannot
    be expected to score above it."""
    scenes = held_out_scenes(n, max_shapes=max_shapes, textured=textured)
    pixels = torch.stack([torch.from_numpy(_as_array(render(s, resolution))).permute(2, 0, 1) for s in scenes])
    return prompt_following_score(roundtrip(pixels), [caption(s) for s in scenes])
