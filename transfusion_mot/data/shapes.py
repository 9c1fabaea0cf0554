"""The embedded "shapes" data set: scene generator, renderer, caption grammar and splits (DESIGN §4).

A scene is 1-2 *groups* of identical shapes (same colour, kind and size; 1-4 each) on a low-saturation
background, described by a caption from a small grammar::

    "a large red circle"
    "two small green triangles above a large blue star"

Because the generator knows the truth, the checker (``metrics/shapes_checker.py``) can read any image (a
real one or a generated one) and say which facts of a caption hold -- colour, shape, count, size and the
relation -- without a pretrained model. Everything is chosen to be learnable in minutes at 64 px and checkable under blur: big upright
shapes, saturated colours far apart in hue, backgrounds whose chroma stays below the checker's threshold.

Coordinates are in [0, 1] (x right, y down), so a scene renders at any resolution.
"""
from __future__ import annotations

import colorsys
import math
import random
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw

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


# ----------------------------------------------------------------------------------------- splits, data set


def split_seed(split: str, index: int) -> int:
    """The seed of item ``index`` of ``split``: splits own disjoint ranges of 10^9 seeds."""
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"split {split!r}: expected one of {sorted(SPLIT_OFFSETS)}")
    if not 0 <= index < SPLIT_OFFSETS["val"]:
        raise IndexError(f"shapes {split} index {index} out of range")
    return SPLIT_OFFSETS[split] + index


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
