"""Metrics through their real code paths, with stand-in weights: a small random TorchScript network in the
layout clean-fid loads the NVIDIA Inception from (FID, both modes), the assets' ResNet-56 (FD-resnet56), a tiny
CLIP fitted in the test (CLIP score), and pycocoevalcap's CIDEr.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from transfusion_mot.metrics import MissingWeights
from transfusion_mot.metrics.cider import cider, tokenize
from transfusion_mot.metrics.clip_score import clip_score, require_clip
from transfusion_mot.metrics.features import ResNet56, build_feature_extractor, load_resnet56
from transfusion_mot.metrics.fid import (CLEANFID_FILE, InceptionFID, compute_fd, compute_fid, frechet_distance,
                                         library_cache_path, require_inception)

NOISE_LEVELS = (0.0, 0.03, 0.1)
N_IMAGES = 4
LIVE_FEATURES = 64  # feature channels that vary in the random Inception (see `_RandomInception`)


# ----------------------------------------------------------------------------------------------- FID fixtures

class _Layers(nn.Module):
    """A small random conv net standing in for Inception's trunk: (B, 3, 299, 299) in [-1, 1] -> (B, 2048, 1, 1)."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.convs = nn.Sequential(nn.Conv2d(3, 32, 7, stride=4), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2),
                                   nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Conv2d(64, 2048, 1)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Conv2d):  # He init keeps activations O(1)
                    m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / m.weight[0].numel()) ** 0.5)
                    m.bias.zero_()
            # Real Inception features are 2048 live channels, whose 2048x2048 matrix square root takes ~20 s on
            # the 2-core CPU; here all but LIVE_FEATURES channels are constant (zero weights, a fixed bias),
            # the file format and shapes stay, and the distance's square root runs on the live block only.
            self.head.weight[LIVE_FEATURES:] = 0.0
            self.head.bias[LIVE_FEATURES:] = 0.5
            self.head.weight[:LIVE_FEATURES] *= 30.0  # FID values of order 1 rather than 1e-3: a clear margin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.convs(x))


class _RandomInception(nn.Module):
    """What clean-fid's InceptionV3W calls on the NVIDIA TorchScript file: ``layers`` (clean mode, on 299x299
    input already scaled to [-1, 1]) and ``forward(x, return_features=True)`` (legacy_tensorflow mode: 0..255
    input of any size, bilinear resize to 299 and the scaling inside)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = _Layers()

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:  # (B, 3, H, W) 0..255
        if x.shape[2] != 299 or x.shape[3] != 299:
            x = nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        features = self.layers((x - 128) / 128).reshape(-1, 2048)
        assert return_features, "the stand-in has no classifier head"
        return features


@pytest.fixture(scope="module")
def cleanfid_inception(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random network as TorchScript in clean-fid's layout, under a non-canonical file name."""
    path = tmp_path_factory.mktemp("inception-ts") / "random-inception.pt"
    torch.jit.script(_RandomInception().eval()).save(str(path))
    return path


@pytest.fixture(scope="module")
def noise_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[float, Path]:
    """Folders of the same smooth 32x32 patterns with increasing, fixed pixel noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32] / 32.0
    clean = []
    for _ in range(N_IMAGES):
        phase, freq = rng.uniform(0, 1, 3), rng.uniform(1, 4)
        clean.append(np.stack([0.5 + 0.5 * np.sin(2 * np.pi * (freq * xx + phase[c] * yy) + 6 * phase[c])
                               for c in range(3)], axis=-1))  # (32, 32, 3)
    noise = rng.normal(size=(N_IMAGES, 32, 32, 3))
    root = tmp_path_factory.mktemp("noise-sets")
    sets = {}
    for level in NOISE_LEVELS:
        folder = root / f"noise{level}"
        folder.mkdir()
        for i in range(N_IMAGES):
            pixels = np.clip(clean[i] + level * noise[i], 0, 1)
            Image.fromarray((pixels * 255).round().astype(np.uint8)).save(folder / f"{i:02d}.png")
        sets[level] = folder
    return sets


def _check_fid_curve(fid: InceptionFID, sets: dict[float, Path]) -> list[float]:
    values = [fid(sets[level]) for level in NOISE_LEVELS]
    assert abs(values[0]) < 1e-3, values  # a set against itself
    assert values[1] > 1e-2 and all(a < b for a, b in zip(values, values[1:])), values  # monotonic in noise
    return values


# ---------------------------------------------------------------------------------------------------- FID

@pytest.mark.parametrize("backend", ["clean", "legacy_tensorflow"])
def test_fid_random_inception_is_zero_on_itself_and_grows_with_noise(backend, cleanfid_inception, noise_sets) -> None:
    fid = InceptionFID(noise_sets[0.0], backend, inception_path=cleanfid_inception)
    values = _check_fid_curve(fid, noise_sets)
    print(f"FID {backend}, random Inception, noise {NOISE_LEVELS}: {values}")
    assert compute_fid(noise_sets[0.03], noise_sets[0.0], backend, cleanfid_inception) == fid(noise_sets[0.03])


def test_fid_modes_share_one_file_and_differ_only_in_the_resize(cleanfid_inception, noise_sets) -> None:
    """clean (PIL bicubic outside) and legacy_tensorflow (bilinear inside) read one file: close, not equal."""
    paths = sorted(noise_sets[0.1].iterdir())
    clean = InceptionFID(paths, "clean-fid", inception_path=cleanfid_inception)  # the old name of clean
    legacy = InceptionFID(paths, "legacy_tensorflow", inception_path=cleanfid_inception)
    a, b = clean.features(paths), legacy.features(paths)
    assert a.shape == b.shape == (N_IMAGES, 2048) and np.isfinite(a).all() and np.isfinite(b).all()
    assert np.count_nonzero(a.std(axis=0)) > LIVE_FEATURES // 2  # the images differ in feature space
    gap = np.abs(a - b).max() / np.abs(a).max()
    assert 1e-4 < gap < 0.2, gap  # the same network; only the resize differs
    ref = noise_sets[0.0]
    assert clean(ref) != legacy(ref)
    with pytest.raises(ValueError, match="FID backend must be one of"):
        InceptionFID(paths, "torchmetrics", inception_path=cleanfid_inception)


def test_frechet_distance_on_live_dims_equals_clean_fid_on_all(noise_sets) -> None:
    """Dropping dims constant in both sets from the square root leaves clean-fid's distance unchanged."""
    from cleanfid.fid import fid_from_feats

    rng = np.random.default_rng(0)
    a, b = np.full((6, 40), 0.5), np.full((6, 40), 0.5)
    b[:, 30:] = 0.7  # constant in both sets, different means: counts through the mean term
    a[:, :8], b[:, :8] = rng.normal(size=(6, 8)), rng.normal(size=(6, 8)) + 0.3
    b[:, 8] = rng.normal(size=6)  # varies in one set only: stays in the square root
    assert frechet_distance(a, b) == pytest.approx(fid_from_feats(a, b), rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)  # sqrtm of a singular product: ~1e-8


@pytest.mark.parametrize("backend", ["clean", "legacy_tensorflow", "clean-fid"])
def test_missing_inception_is_explained_before_any_work(backend: str, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "inception.pt"
    with pytest.raises(MissingWeights) as err:  # folders do not exist either: the weights are checked first
        compute_fid(tmp_path / "gen", tmp_path / "ref", backend, inception_path=missing)
    text = str(err.value)
    assert CLEANFID_FILE in text and "--inception PATH" in text and str(missing) in text
    assert str(library_cache_path()) in text
    assert isinstance(err.value, FileNotFoundError)
    if not library_cache_path().exists():  # e.g. /tmp/inception-2015-12-05.pt on a machine that has it
        with pytest.raises(MissingWeights, match="--inception PATH"):
            require_inception(backend)
        with pytest.raises(MissingWeights, match="--inception PATH"):
            build_feature_extractor("inception")
    with pytest.raises(ValueError, match="backend"):
        require_inception("pytorch-fid")


def test_inception_feature_net_is_fid_in_legacy_tensorflow_mode(cleanfid_inception, noise_sets) -> None:
    """``--features inception``: clean-fid's TorchScript Inception, resize inside, so compute_fd is FID."""
    extractor = build_feature_extractor("inception", cleanfid_inception)
    score = compute_fd(noise_sets[0.1], noise_sets[0.0], extractor)
    legacy = compute_fid(noise_sets[0.1], noise_sets[0.0], "legacy_tensorflow", cleanfid_inception)
    assert score.name == "FID" and score.value == pytest.approx(legacy, rel=1e-9) and score.value > 1e-2


# ------------------------------------------------------------------------------------------- FD-resnet56

def test_fd_resnet56_is_labelled_and_monotonic(assets_dir: Path, noise_sets) -> None:
    extractor = build_feature_extractor("resnet56", assets_dir / "features" / "resnet56-cifar10.th")
    scores = [compute_fd(noise_sets[level], noise_sets[0.0], extractor) for level in NOISE_LEVELS]
    assert {s.name for s in scores} == {"FD-resnet56"}
    values = [s.value for s in scores]
    assert abs(values[0]) < 1e-4 and values[0] < values[1] < values[2], values
    photos = sorted((assets_dir / "images" / "flickr8k-1000").glob("*.jpg"))[:4]  # mixed sizes, one per batch
    assert compute_fd(photos, photos, extractor, batch_size=2).value == pytest.approx(0.0, abs=1e-4)
    print(f"FD-resnet56 noise {NOISE_LEVELS}: {values}")


def test_feature_nets_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown feature network 'vgg'"):
        build_feature_extractor("vgg", tmp_path / "x")
    with pytest.raises(MissingWeights, match="resnet56"):
        build_feature_extractor("resnet56", tmp_path / "missing.th")
    state = {f"module.{k}": v for k, v in ResNet56().state_dict().items() if k != "linear.bias"}
    torch.save({"state_dict": state}, tmp_path / "broken.th")
    with pytest.raises(ValueError, match=r"broken\.th.*linear\.bias"):
        load_resnet56(tmp_path / "broken.th")


# --------------------------------------------------------------------------------------------- CLIP score

def _clip_tokenizer(assets: Path | None):
    """CLIP's BPE built from the assets' merges (per MANIFEST), or a character-level stand-in without them."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    merges: list[tuple[str, str]] = []
    bpe = None if assets is None else assets / "tokenizers" / "clip" / "bpe_simple_vocab_16e6.txt.gz"
    if bpe is not None and bpe.exists():
        lines = gzip.open(bpe, "rt", encoding="utf-8").read().split("\n")[1:49152 - 256 - 2 + 1]
        merges = [tuple(line.split()) for line in lines]
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>",
                                                                                  "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    try:
        assets = request.getfixturevalue("assets_dir")
    except pytest.skip.Exception:
        assets = None
    tokenizer = _clip_tokenizer(assets)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32, **ids),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2),
        projection_dim=16)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.1, 0.2, 1.0), "yellow": (1.0, 0.9, 0.1),
           "black": (0.0, 0.0, 0.0), "white": (1.0, 1.0, 1.0)}


def _colour_images() -> tuple[torch.Tensor, list[str]]:
    rgb = torch.tensor(list(COLOURS.values())).view(-1, 3, 1, 1).expand(-1, 3, 32, 32).clone()  # (6, 3, 32, 32)
    rgb[:, :, 8:24, 8:24] = 0.5  # a grey square in the middle, so images are not flat
    return rgb, [f"a {name} picture" for name in COLOURS]


def _fit_contrastively(src: Path, dst: Path, images: torch.Tensor, prompts: list[str], steps: int) -> None:
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(src), CLIPProcessor.from_pretrained(src)
    batch = processor(text=prompts, images=list((images * 255).round().to(torch.uint8)), return_tensors="pt",
                      padding=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(**batch, return_loss=True).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(dst)
    processor.save_pretrained(dst)


def test_clip_score_deterministic_and_prefers_matching_pairs(tiny_clip: Path, tmp_path: Path) -> None:
    images, prompts = _colour_images()
    first = clip_score(images, prompts, tiny_clip, batch_size=4)
    assert 0.0 <= first <= 100.0  # torchmetrics floors the mean at 0; a random CLIP often sits there
    fitted = tmp_path / "fitted"
    _fit_contrastively(tiny_clip, fitted, images, prompts, steps=30)
    matching = clip_score(images, prompts, fitted, batch_size=4)
    assert matching == clip_score(images, prompts, fitted, batch_size=4)  # deterministic
    assert matching == pytest.approx(clip_score(images, prompts, fitted, batch_size=16), abs=1e-3)  # batching
    shuffled = clip_score(images, prompts[1:] + prompts[:1], fitted)
    assert matching > shuffled + 10, (matching, shuffled)
    print(f"CLIP score tiny random {first:.4f}; after fitting matching {matching:.4f} shuffled {shuffled:.4f}")


def test_clip_missing_and_bad_inputs(tiny_clip: Path, tmp_path: Path) -> None:
    with pytest.raises(MissingWeights) as err:
        require_clip("openai/clip-vit-large-patch14")  # HF_HUB_OFFLINE=1 and an empty HF_HOME (conftest)
    assert "openai/clip-vit-large-patch14" in str(err.value) and "--clip PATH" in str(err.value)
    with pytest.raises(MissingWeights, match="--clip PATH"):
        require_clip(tmp_path / "no-model")
    images, prompts = _colour_images()
    with pytest.raises(ValueError, match="6 images but 5 prompts"):
        clip_score(images, prompts[:5], tiny_clip)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        clip_score(images * 2, prompts, tiny_clip)


# -------------------------------------------------------------------------------------------------- CIDEr

REFS = {
    "img1": ["A dog runs across the green grass.", "a brown dog running on a lawn", "Dog playing in a park."],
    "img2": ["Two people ride bicycles down a city street.", "cyclists on a busy road", "two bikers in traffic"],
    "img3": ["A plate of pasta with tomato sauce.", "spaghetti on a white plate", "a bowl of noodles and sauce"],
    "img4": ["A red boat sailing on the lake.", "a small sailboat on calm water", "boat on a lake at sunset"],
}


def test_cider_identical_high_unrelated_zero() -> None:
    identical = cider(REFS, {k: v[0] for k, v in REFS.items()})
    unrelated = cider(REFS, {k: "purple elephants juggling violins" for k in REFS})
    swapped = cider(REFS, {k: REFS[other][0] for k, other in zip(REFS, ["img2", "img3", "img4", "img1"])})
    assert identical > 1.0 and unrelated < 1e-6 and swapped < identical / 5, (identical, unrelated, swapped)
    assert tokenize("A Dog's ball,  RED!") == "a dogs ball red"
    with pytest.raises(ValueError, match="same keys.*'img4'"):
        cider(REFS, {k: v[0] for k, v in REFS.items() if k != "img4"})
    with pytest.raises(ValueError, match=r"refs\['x'\]"):
        cider({"x": []}, {"x": "a caption"})
    print(f"CIDEr identical {identical:.4f} unrelated {unrelated:.4f} swapped {swapped:.4f}")
