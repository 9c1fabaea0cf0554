"""The embedded "shapes" data set and the checker that scores prompt-following on it (DESIGN §4).

A scene is 1-2 *groups* of identical shapes (same colour, kind and size; 1-4 each) on a low-saturation
background, described by a caption from a small grammar::

    "a large red circle"
    "two small green triangles above a large blue star"

Because the generator knows the truth, ``check`` can read any image (a real one or a generated one) and
say which facts of a caption hold -- colour, shape, count, size and the relation -- without a pretrained
model. Everything is chosen to be learnable in minutes at 64 px and checkable under blur: big upright
shapes, saturated colours far apart in hue, backgrounds whose chroma stays below the checker's threshold.

Coordinates are in [0, 1] (x right, y down), so a scene renders at any resolution.
"""
from __future__ import annotations

import colorsys
import functools
import math
import random
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage

from .segments import Record

# ---------------------------------------------------------------------------------------------- vocabulary
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "orange": (255, 125, 0),
    "yellow": (240, 225, 0),
    "green": (20, 195, 40),
    "cyan": (0, 200, 225),
    "blue": (25, 60, 240),
    "purple": (150, 30, 220),
    "pink": (245, 60, 170),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = ("small", "large")
RELATIONS = ("above", "below", "left of", "right of")
COUNT_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
RADIUS = {"small": 0.095, "large": 0.16}  # half the bounding box side, in image widths
SPLIT_OFFSETS = {"train": 0, "val": 1_000_000_000, "test": 2_000_000_000}  # disjoint seed ranges
VERSION = 1  # bump when the generator changes: it is part of ``ShapesDataset.name`` (a cache key)

_PAD = 0.03  # shapes keep this far from the image border
_GAP = 0.05  # and this far from each other (bounding boxes), so blobs never merge
_RELATION_GAP = 0.22  # generator: group centroids this far apart along the relation's axis
_STAR_INNER = 0.5  # inner / outer radius: a fat star survives blur and 32 px

# ------------------------------------------------------------------------------------------------- scenes


@dataclass
class Shape:
    kind: str  # one of SHAPES
    colour: str  # a key of COLOURS
    size: str  # one of SIZES
    cx: float  # centre, [0, 1]
    cy: float
    r: float  # half the bounding-box side, [0, 1]


@dataclass
class Background:
    """A low-chroma backdrop: ``kind`` in plain / gradient / stripes / checker / clouds."""

    kind: str
    base: tuple[int, int, int]
    alt: tuple[int, int, int]
    angle: float = 0.0  # radians, for gradient and stripes
    period: float = 0.25  # image widths, for stripes and checker
    seed: int = 0  # clouds: the low-resolution noise grid


@dataclass
class Scene:
    shapes: list[Shape]
    background: Background = field(default_factory=lambda: Background("plain", (128, 128, 128), (128, 128, 128)))


@dataclass(frozen=True)
class Group:
    """One group fact of a caption: ``count`` shapes of ``kind`` in ``colour`` (``size`` may be unstated)."""

    count: int
    colour: str
    kind: str
    size: str | None = None


class Caption(NamedTuple):
    groups: list[Group]
    relation: str | None  # groups[0] <relation> groups[1]


def make_scene(seed: int, max_shapes: int = 4, textured: bool = True) -> Scene:
    """The scene of ``seed``: the same in every process. Shapes are drawn before the background, so a
    seed's caption does not depend on ``textured``."""
    if not 1 <= max_shapes <= 4:
        raise ValueError(f"max_shapes={max_shapes}: must be in 1..4")
    rng = random.Random(seed)
    groups = _sample_groups(rng, max_shapes)
    relation = rng.choice(RELATIONS) if len(groups) == 2 else None
    shapes = _place(rng, groups, relation, seed)
    return Scene(shapes, _sample_background(rng, textured))


def _sample_groups(rng: random.Random, max_shapes: int) -> list[Group]:
    """1-2 groups of distinct colours; small counts are likelier, which keeps the task learnable."""
    n_groups = 1 if max_shapes == 1 else rng.choice((1, 2))
    colours = rng.sample(sorted(COLOURS), n_groups)  # groups differ in colour: the checker keys on it
    if n_groups == 1:
        options = list(range(1, max_shapes + 1))
        counts = rng.choices(options, weights=[5 - n for n in options])
    else:
        counts = [4, 4]
        while sum(counts) > max_shapes:
            counts = rng.choices((1, 2, 3), weights=(3, 2, 1), k=2)
    return [Group(n, c, rng.choice(SHAPES), rng.choice(SIZES)) for n, c in zip(counts, colours)]


def _place(rng: random.Random, groups: list[Group], relation: str | None, seed: int) -> list[Shape]:
    """Rejection sampling: no two bounding boxes closer than _GAP; a stated relation clearly true."""
    for _ in range(2000):
        shapes: list[Shape] = []
        for g_index, group in enumerate(groups):
            r = RADIUS[group.size]
            for _ in range(group.count):
                shape = _place_one(rng, group, r, _half(relation, g_index), shapes)
                if shape is None:
                    break
                shapes.append(shape)
        if len(shapes) == sum(g.count for g in groups):
            if relation is None or _clear_relation(shapes[: groups[0].count], shapes[groups[0].count:], relation):
                return shapes
    raise RuntimeError(f"shapes seed {seed}: no layout found for {groups} {relation}")


def _half(relation: str | None, g_index: int) -> tuple[float, float, float, float]:
    """The box (x0, x1, y0, y1) a group's centres are drawn from: a bias that makes the relation likely."""
    if relation is None:
        return 0.0, 1.0, 0.0, 1.0
    first = (g_index == 0) == (relation in ("above", "left of"))  # this group takes the low coordinates
    lo, hi = (0.0, 0.6) if first else (0.4, 1.0)
    return (lo, hi, 0.0, 1.0) if relation in ("left of", "right of") else (0.0, 1.0, lo, hi)


def _place_one(rng: random.Random, group: Group, r: float, box: tuple[float, float, float, float],
               placed: list[Shape]) -> Shape | None:
    x0, x1, y0, y1 = box
    lo, hi = _PAD + r, 1.0 - _PAD - r
    for _ in range(50):
        cx = rng.uniform(max(lo, x0), min(hi, x1))
        cy = rng.uniform(max(lo, y0), min(hi, y1))
        if all(max(abs(cx - s.cx) - r - s.r, abs(cy - s.cy) - r - s.r) >= _GAP for s in placed):
            return Shape(group.kind, group.colour, group.size, cx, cy, r)
    return None


def _clear_relation(a: list[Shape], b: list[Shape], relation: str) -> bool:
    """The generator's bar: far apart on the relation's axis and further than on the other axis."""
    dx = np.mean([s.cx for s in b]) - np.mean([s.cx for s in a])
    dy = np.mean([s.cy for s in b]) - np.mean([s.cy for s in a])
    along, across = {"above": (dy, dx), "below": (-dy, dx), "left of": (dx, dy), "right of": (-dx, dy)}[relation]
    return along >= _RELATION_GAP and along > abs(across)


def _sample_background(rng: random.Random, textured: bool) -> Background:
    """Low chroma (HSV s * v <= 0.15) so the checker never mistakes background for a shape."""
    hue, sat = rng.random(), rng.uniform(0.0, 0.15)
    value = rng.uniform(0.35, 0.9)
    alt_value = min(0.95, max(0.3, value + rng.choice((-1, 1)) * rng.uniform(0.12, 0.3)))
    base = tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, sat, value))
    alt = tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, rng.uniform(0.0, 0.15), alt_value))
    kinds = ("plain", "gradient", "stripes", "checker", "clouds") if textured else ("plain",)
    return Background(rng.choice(kinds), base, alt, angle=rng.uniform(0, math.pi),
                      period=rng.uniform(0.12, 0.35), seed=rng.getrandbits(32))


# ------------------------------------------------------------------------------------------------ drawing


def render(scene: Scene, resolution: int) -> Image.Image:
    """RGB image of ``scene``. Shapes are drawn at 2-4x and box-filtered down (antialiasing), then
    composited over a background computed at the target resolution."""
    if resolution < 8:
        raise ValueError(f"resolution={resolution}: must be >= 8")
    scale = 4 if resolution <= 64 else 2
    big = resolution * scale
    colour_layer = Image.new("RGB", (big, big))
    alpha_layer = Image.new("L", (big, big))
    draw_colour, draw_alpha = ImageDraw.Draw(colour_layer), ImageDraw.Draw(alpha_layer)
    for shape in scene.shapes:
        outline = _outline(shape, big)
        for draw, fill in ((draw_colour, COLOURS[shape.colour]), (draw_alpha, 255)):
            if shape.kind == "circle":
                draw.ellipse(outline, fill=fill)
            elif shape.kind == "square":
                draw.rectangle(outline, fill=fill)
            else:
                draw.polygon(outline, fill=fill)
    small = (resolution, resolution)
    premultiplied = np.asarray(colour_layer.resize(small, Image.BOX), dtype=np.float32)  # (H, W, 3)
    alpha = np.asarray(alpha_layer.resize(small, Image.BOX), dtype=np.float32)[..., None] / 255.0  # (H, W, 1)
    out = _background(scene.background, resolution) * (1.0 - alpha) + premultiplied
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), "RGB")


def _outline(shape: Shape, big: int) -> list[tuple[float, float]]:
    """Pixel outline at canvas size ``big``: a bounding box for circle/square, vertices otherwise."""
    cx, cy, r = shape.cx * big, shape.cy * big, shape.r * big
    if shape.kind in ("circle", "square"):
        return [(cx - r, cy - r), (cx + r, cy + r)]
    if shape.kind == "triangle":  # apex up, base and height 2r
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    outer = 1.05 * r  # star: point up, box ~2r wide, re-centred vertically
    cy += outer * (1 - math.cos(math.pi / 5)) / 2
    points = []
    for k in range(10):
        angle, radius = -math.pi / 2 + k * math.pi / 5, outer if k % 2 == 0 else outer * _STAR_INNER
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _background(bg: Background, resolution: int) -> np.ndarray:
    """(H, W, 3) float32 in 0..255; a function of [0, 1] coordinates, so any resolution draws the same."""
    base, alt = np.array(bg.base, np.float32), np.array(bg.alt, np.float32)
    if bg.kind == "plain":
        return np.broadcast_to(base, (resolution, resolution, 3)).astype(np.float32)
    u = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution
    x, y = u[None, :], u[:, None]  # (1, W), (H, 1)
    along = x * math.cos(bg.angle) + y * math.sin(bg.angle)  # (H, W)
    if bg.kind == "gradient":
        mix = (along - along.min()) / max(float(along.max() - along.min()), 1e-6)
    elif bg.kind == "stripes":
        mix = 0.5 + 0.5 * np.sin(2 * math.pi * along / bg.period)
    elif bg.kind == "checker":
        mix = ((np.floor(x / bg.period) + np.floor(y / bg.period)) % 2).astype(np.float32)
    elif bg.kind == "clouds":
        grid = np.random.default_rng(bg.seed).random((5, 5), dtype=np.float32)
        mix = np.asarray(Image.fromarray(grid, "F").resize((resolution, resolution), Image.BICUBIC))
        mix = np.clip(mix, 0.0, 1.0)
    else:
        raise ValueError(f"background kind {bg.kind!r}: expected plain, gradient, stripes, checker or clouds")
    return base + (alt - base) * mix[..., None]


# ------------------------------------------------------------------------------------------------ captions


def caption(scene: Scene) -> str:
    """The one canonical caption: groups in order of first appearance, size always stated."""
    groups = scene_groups(scene)
    if not 1 <= len(groups) <= 2:
        raise ValueError(f"scene has {len(groups)} groups; the grammar describes 1 or 2")
    relation = None
    if len(groups) == 2:
        (_, a), (_, b) = groups
        dx = np.mean([s.cx for s in b]) - np.mean([s.cx for s in a])
        dy = np.mean([s.cy for s in b]) - np.mean([s.cy for s in a])
        if abs(dy) >= abs(dx):
            relation = "above" if dy > 0 else "below"
        else:
            relation = "left of" if dx > 0 else "right of"
    return format_caption(Caption([g for g, _ in groups], relation))


def format_caption(parsed: Caption) -> str:
    """The text of parsed groups and relation: the inverse of ``parse_caption``."""
    phrases = [_phrase(g) for g in parsed.groups]
    return phrases[0] if parsed.relation is None else f"{phrases[0]} {parsed.relation} {phrases[1]}"


def scene_groups(scene: Scene) -> list[tuple[Group, list[Shape]]]:
    """(group fact, its shapes) in order of first appearance."""
    found: dict[tuple[str, str, str], list[Shape]] = {}
    for s in scene.shapes:
        found.setdefault((s.colour, s.kind, s.size), []).append(s)
    return [(Group(len(shapes), c, k, z), shapes) for (c, k, z), shapes in found.items()]


def _phrase(group: Group) -> str:
    size = f"{group.size} " if group.size else ""
    return f"{COUNT_WORDS[group.count]} {size}{group.colour} {group.kind}{'s' if group.count > 1 else ''}"


_NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}


def vocabulary() -> list[str]:
    """Every word the grammar (and ``parse_caption``) uses, in a fixed order: the ``shapes-words`` tokenizer."""
    words = [*_NUMBERS, *SIZES, *COLOURS, *SHAPES, *(f"{s}s" for s in SHAPES)]
    words += [w for r in RELATIONS for w in r.split()] + [".", ","]
    return list(dict.fromkeys(words))
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


# ----------------------------------------------------------------------------------------- splits, data set


def split_seed(split: str, index: int) -> int:
    """The seed of item ``index`` of ``split``: splits own disjoint ranges of 10^9 seeds."""
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"split {split!r}: expected one of {sorted(SPLIT_OFFSETS)}")
    if not 0 <= index < SPLIT_OFFSETS["val"]:
        raise IndexError(f"shapes {split} index {index} out of range")
    return SPLIT_OFFSETS[split] + index


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


class ShapesDataset(torch.utils.data.Dataset):
    """Map-style ``Record`` source: item i of a split is ``make_scene`` of a fixed seed, in any process."""

    def __init__(self, split: str = "train", size: int = 50000, resolution: int = 64, max_shapes: int = 4,
                 textured: bool = True):
        split_seed(split, max(size - 1, 0))  # validates split and size
        if size < 1:
            raise ValueError(f"shapes size={size}: must be >= 1")
        if not 1 <= max_shapes <= 4:
            raise ValueError(f"shapes max_shapes={max_shapes}: must be in 1..4")
        self.split, self.size, self.resolution = split, size, resolution
        self.max_shapes, self.textured = max_shapes, textured
        self.name = (f"shapes-v{VERSION}-{split}-n{size}-r{resolution}-m{max_shapes}"
                     f"-{'textured' if textured else 'plain'}")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> Record:
        if not 0 <= i < self.size:
            raise IndexError(f"{self.name}: index {i} out of range (size {self.size})")
        scene = make_scene(split_seed(self.split, i), self.max_shapes, self.textured)
        return Record(image=render(scene, self.resolution), captions=[caption(scene)],
                      key=f"shapes-{self.split}-{i}", meta={"scene": scene})
