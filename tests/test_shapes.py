"""The shapes generator and its prompt-following checker: determinism, grammar, and checker scores."""
from __future__ import annotations

import dataclasses
import re
import statistics
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from transfusion_mot.data import shapes as S
from transfusion_mot.data.segments import Record
from transfusion_mot.metrics import shapes_checker as C


def _test_items(n: int, resolution: int, start: int = 0):
    scenes = [S.make_scene(S.split_seed("test", i)) for i in range(start, start + n)]
    return scenes, [S.render(s, resolution) for s in scenes], [S.caption(s) for s in scenes]


def test_palette_is_saturated_and_hue_separated():
    assert len(S.COLOURS) >= 8 and S.SIZES == ("small", "large")
    assert {"circle", "square", "triangle", "star"} <= set(S.SHAPES)
    hues = np.sort(np.degrees(C._PALETTE_HUES) % 360)
    gaps = np.diff(np.append(hues, hues[0] + 360))
    assert gaps.min() > 20, f"palette hues too close: {hues}"
    rgb = np.array(list(S.COLOURS.values())) / 255
    assert (rgb.max(1) - rgb.min(1)).min() > 2 * C._CHROMA_MIN  # far above the checker's threshold


def test_scene_is_deterministic_and_seed_dependent():
    a, b = S.make_scene(123), S.make_scene(123)
    assert a == b
    assert np.array_equal(np.asarray(S.render(a, 64)), np.asarray(S.render(b, 64)))
    assert S.make_scene(124) != a
    # a fresh data set object (another process) yields the same item
    x, y = S.ShapesDataset("train", size=10)[7], S.ShapesDataset("train", size=10)[7]
    assert x.captions == y.captions and np.array_equal(np.asarray(x.image), np.asarray(y.image))


def test_scenes_obey_the_layout_rules():
    for seed in range(300):
        scene = S.make_scene(seed, max_shapes=4)
        assert 1 <= len(scene.shapes) <= 4 and 1 <= len(S.scene_groups(scene)) <= 2
        for i, p in enumerate(scene.shapes):
            assert 0 <= p.cx - p.r and p.cx + p.r <= 1 and 0 <= p.cy - p.r and p.cy + p.r <= 1
            for q in scene.shapes[i + 1:]:  # bounding boxes apart: no overlap
                assert max(abs(p.cx - q.cx) - p.r - q.r, abs(p.cy - q.cy) - p.r - q.r) > 0.04
        groups = S.scene_groups(scene)
        if len(groups) == 2:
            assert groups[0][0].colour != groups[1][0].colour
    assert all(len(S.make_scene(seed, max_shapes=2).shapes) <= 2 for seed in range(100))
    with pytest.raises(ValueError, match="max_shapes"):
        S.make_scene(0, max_shapes=5)


def test_splits_are_disjoint_and_validated():
    seeds = {split: {S.split_seed(split, i) for i in (0, 1, 49_999, 999_999)} for split in ("train", "val", "test")}
    assert not (seeds["train"] & seeds["val"]) and not (seeds["train"] & seeds["test"]) \
        and not (seeds["val"] & seeds["test"])
    train, test = S.ShapesDataset("train", 4), S.ShapesDataset("test", 4)
    assert all(train[i].meta["scene"] != test[i].meta["scene"] for i in range(4))
    with pytest.raises(ValueError, match="'dev'"):
        S.ShapesDataset("dev")


def test_textured_only_changes_the_background():
    for seed in range(20):
        plain, textured = S.make_scene(seed, textured=False), S.make_scene(seed, textured=True)
        assert plain.shapes == textured.shapes and plain.background.kind == "plain"
    kinds = {S.make_scene(seed).background.kind for seed in range(60)}
    assert kinds == {"plain", "gradient", "stripes", "checker", "clouds"}


def test_captions_parse_and_round_trip():
    for seed in range(300):
        scene = S.make_scene(S.split_seed("val", seed))
        text = S.caption(scene)
        parsed = C.parse_caption(text)
        assert [g for g, _ in S.scene_groups(scene)] == parsed.groups
        assert S.format_caption(parsed) == text
        assert (parsed.relation is None) == (len(parsed.groups) == 1)
    groups, relation = C.parse_caption("Two GREEN triangles above a small red circle.")
    assert groups == [S.Group(2, "green", "triangle", None), S.Group(1, "red", "circle", "small")]
    assert relation == "above"


@pytest.mark.parametrize("text", ["", "a red circle beside a blue square", "two red circle", "a red circles",
                                  "a magenta circle", "a red circle above a red square", "five red circles"])
def test_bad_caption_raises_naming_the_text(text):
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        C.parse_caption(text)
    with pytest.raises(ValueError):
        C.check(np.zeros((32, 32, 3), np.uint8), text)


@pytest.mark.parametrize("resolution,n", [(64, 200), (32, 60), (128, 40)])
def test_checker_scores_real_images_high(resolution, n):
    scenes, images, captions = _test_items(n, resolution)
    results = [C.check(img, cap) for img, cap in zip(images, captions)]
    assert np.mean([r.score for r in results]) >= 0.95
    assert all(0.0 <= r.score <= 1.0 for r in results)
    two = next(r for r, s in zip(results, scenes) if len(S.scene_groups(s)) == 2)
    assert {"g0.colour", "g0.shape", "g0.count", "g0.size", "g1.colour", "relation"} <= set(two.facts)


def test_checker_tolerates_blur():
    _, images, captions = _test_items(100, 64)
    blurred = [img.filter(ImageFilter.GaussianBlur(1)) for img in images]
    assert C.prompt_following_score(blurred, captions) >= 0.85


def test_checker_gives_blank_and_noise_nothing():
    captions = C.held_out_prompts(40)
    blanks = [np.full((64, 64, 3), level, np.uint8) for level in (0, 64, 128, 192, 255)]
    blank_scores = [C.check(img, cap).score for img in blanks for cap in captions]
    assert max(blank_scores) <= 0.1
    for resolution in (32, 64):
        gen = torch.Generator().manual_seed(resolution)
        noise = [torch.rand(3, resolution, resolution, generator=gen) for _ in captions]
        assert C.prompt_following_score(noise, captions) <= 0.1


def test_wrong_captions_score_lower_and_fail_the_right_fact():
    scenes, images, captions = _test_items(60, 64, start=300)
    right, wrong = [], []
    for scene, img, text in zip(scenes, images, captions):
        groups, relation = C.parse_caption(text)
        used = {g.colour for g in groups}
        other = next(c for c in S.COLOURS if c not in used)
        recoloured = S.format_caption(S.Caption([dataclasses.replace(groups[0], colour=other)] + groups[1:], relation))
        reshaped_kind = next(k for k in S.SHAPES if k != groups[0].kind)
        reshaped = S.format_caption(S.Caption([dataclasses.replace(groups[0], kind=reshaped_kind)] + groups[1:],
                                              relation))
        right.append(C.check(img, text).score)
        wrong.append(C.check(img, recoloured).score)
        assert not C.check(img, recoloured).facts["g0.colour"]
        assert not C.check(img, reshaped).facts["g0.shape"]
        if relation is not None:
            flipped = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}[relation]
            assert not C.check(img, S.format_caption(S.Caption(groups, flipped))).facts["relation"]
    assert np.mean(wrong) < np.mean(right) - 0.4


def test_chance_score_is_well_below_half():
    assert C.chance_score(n=64) < 0.25


def test_checker_accepts_tensor_pil_and_array_alike():
    scene = S.make_scene(S.split_seed("test", 5))
    img, text = S.render(scene, 64), S.caption(scene)
    arr = np.asarray(img)
    tensor = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255
    scores = {C.check(x, text).score for x in (img, arr, tensor, tensor * 1.2 - 0.1)}
    assert scores == {1.0}
    with pytest.raises(ValueError, match="expected"):
        C.check(torch.zeros(64, 64), text)
    with pytest.raises(ValueError, match="images for"):
        C.prompt_following_score([img], [text, text])


def test_dataset_records_name_and_speed():
    ds = S.ShapesDataset("val", size=30, resolution=64, max_shapes=3, textured=False)
    rec = ds[3]
    assert isinstance(rec, Record) and rec.key == "shapes-val-3" and rec.image.size == (64, 64)
    assert rec.image.mode == "RGB" and rec.captions == [S.caption(rec.meta["scene"])]
    assert len(ds) == 30 and len(rec.meta["scene"].shapes) <= 3
    names = {S.ShapesDataset(*args).name for args in
             [("val", 30, 64, 3, False), ("val", 30, 64, 3, True), ("val", 30, 32, 3, False),
              ("val", 31, 64, 3, False), ("test", 30, 64, 3, False), ("val", 30, 64, 4, False)]}
    assert len(names) == 6
    with pytest.raises(IndexError):
        ds[30]
    times = []
    for i in range(30):
        t0 = time.perf_counter()
        _ = ds[i]
        times.append(time.perf_counter() - t0)
    assert statistics.median(times) < 0.005


def test_checker_is_fast():
    _, images, captions = _test_items(30, 64)
    arrays = [np.asarray(img) for img in images]
    times = []
    for arr, cap in zip(arrays, captions):
        t0 = time.perf_counter()
        C.check(arr, cap)
        times.append(time.perf_counter() - t0)
    assert statistics.median(times) < 0.005


def test_held_out_prompts_are_the_test_captions():
    prompts = C.held_out_prompts(12)
    assert prompts == C.held_out_prompts(12) and len(prompts) == 12
    ds = S.ShapesDataset("test", size=12)
    assert prompts == [ds[i].captions[0] for i in range(12)]
    assert C.held_out_prompts(5, split="val") != prompts[:5]


def test_render_is_resolution_independent():
    scene = S.make_scene(S.split_seed("test", 9))
    small = np.asarray(S.render(scene, 32), np.float32)
    large = np.asarray(S.render(scene, 128).resize((32, 32), Image.BOX), np.float32)
    assert np.abs(small - large).mean() < 6  # same picture, up to antialiasing


def test_reconstruction_score_reads_what_a_codec_keeps():
    """Identity keeps every fact; a grey codec keeps none; swapping red and blue loses the colours."""
    assert C.reconstruction_score(lambda x: x, n=12, max_shapes=2, textured=False) == 1.0
    assert C.reconstruction_score(lambda x: torch.full_like(x, 0.5), n=12, max_shapes=2) == 0.0
    swapped = C.reconstruction_score(lambda x: x[:, [2, 1, 0]], n=12, max_shapes=2, textured=False)
    assert swapped < 0.5
