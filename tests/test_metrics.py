"""Metrics through their real code paths, with stand-in weights: a randomly initialised Inception saved in
both libraries' formats (FID), the assets' ResNet-56 (FD-resnet56), a tiny CLIP fitted in the test
(CLIP score), and pycocoevalcap's CIDEr.
"""
from __future__ import annotations

import gzip
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from transfusion_mot.metrics import MissingWeights
from transfusion_mot.metrics.cider import cider, tokenize
from transfusion_mot.metrics.clip_score import clip_score, require_clip
from transfusion_mot.metrics.features import ResNet56, build_feature_extractor, load_resnet56
from transfusion_mot.metrics.fid import (CLEANFID_FILE, FIDELITY_FILE, InceptionFID, compute_fd, compute_fid,
                                         library_cache_path, require_inception)

NOISE_LEVELS = (0.0, 0.03, 0.1)
N_IMAGES = 4
LIVE_FEATURES = 64  # feature channels left alive in the random Inception (see `fidelity_inception`)
# torch-fidelity's trunk, in forward order, up to the 2048-d pooled features
_TRUNK = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
          "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
          "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool")


# ----------------------------------------------------------------------------------------------- FID fixtures

def _random_fidelity_inception() -> nn.Module:
    """torch-fidelity's FeatureExtractorInceptionV3 with random weights (its constructor would download)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    with mock.patch.object(tfi, "load_state_dict_from_url", return_value={}), \
            mock.patch.object(tfi.FeatureExtractorInceptionV3, "load_state_dict", return_value=None):
        net = tfi.FeatureExtractorInceptionV3("random-inception", ["2048"])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):  # He init keeps activations O(1) through 90+ layers
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / m.weight[0].numel()) ** 0.5)
        # A 2048x2048 eigendecomposition takes about a minute on 2 busy cores. Silencing all but
        # LIVE_FEATURES output channels (ReLU of a very negative BN bias is exactly 0) keeps the
        # architecture and the file format but lets the eigen-solvers deflate the zero block at once.
        last = net.Mixed_7c
        for name, mod in last.named_modules():
            if isinstance(mod, nn.BatchNorm2d) and name.split(".")[0] in {"branch1x1", "branch3x3_2a",
                                                                          "branch3x3_2b", "branch3x3dbl_3a",
                                                                          "branch3x3dbl_3b", "branch_pool"}:
                keep = LIVE_FEATURES if name.startswith("branch1x1") else 0
                mod.bias[keep:] = -1e4
                mod.weight[:keep] = 30.0  # FID values of order 1 rather than 1e-3: a clear margin over ~0
    return net.eval()


class _Trunk(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(getattr(net, name) for name in _TRUNK))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 299, 299) in [-1, 1] -> (B, 2048)
        return torch.flatten(self.blocks(x), 1)


class _CleanFIDLayout(nn.Module):
    """What clean-fid's InceptionV3W expects of the TorchScript file: a ``layers`` submodule -> 2048 features."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.layers = _Trunk(net)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@pytest.fixture(scope="module")
def fidelity_inception(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    """The random network and its state dict, saved as torch-fidelity / torchmetrics load it."""
    net = _random_fidelity_inception()
    path = tmp_path_factory.mktemp("inception") / "random-fidelity-inception.pth"
    torch.save(net.state_dict(), path)
    return net, path


@pytest.fixture(scope="module")
def cleanfid_inception(fidelity_inception: tuple[nn.Module, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same random network as TorchScript in clean-fid's layout, under a non-canonical file name."""
    path = tmp_path_factory.mktemp("inception-ts") / "random-inception.pt"
    torch.jit.script(_CleanFIDLayout(fidelity_inception[0])).save(str(path))
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

def test_fid_torchmetrics_random_inception(fidelity_inception, noise_sets) -> None:
    fid = InceptionFID(noise_sets[0.0], "torchmetrics", inception_path=fidelity_inception[1])
    values = _check_fid_curve(fid, noise_sets)
    print(f"FID torchmetrics, random Inception, noise {NOISE_LEVELS}: {values}")


def test_fid_cleanfid_loads_local_torchscript(cleanfid_inception, noise_sets) -> None:
    """clean-fid's own InceptionV3W and resize run on a local file that does not carry its canonical name."""
    pair = sorted(noise_sets[0.1].iterdir())[:2]
    fid = InceptionFID(pair, "clean-fid", inception_path=cleanfid_inception)
    feats = fid.features(pair)
    assert feats.shape == (2, 2048) and np.isfinite(feats).all()
    assert np.count_nonzero(feats.std(axis=0)) > LIVE_FEATURES // 2  # the two images differ in feature space


@pytest.mark.slow
def test_fid_cleanfid_random_inception(cleanfid_inception, noise_sets) -> None:
    """Slow: clean-fid's scipy sqrtm of a 2048x2048 product takes ~40 s per FID on the 2-core CPU."""
    fid = InceptionFID(noise_sets[0.0], "clean-fid", inception_path=cleanfid_inception)
    print(f"FID clean-fid, random Inception, noise {NOISE_LEVELS}: {_check_fid_curve(fid, noise_sets)}")
    assert compute_fid(noise_sets[0.03], noise_sets[0.0], "clean-fid", cleanfid_inception) == fid(noise_sets[0.03])


@pytest.mark.parametrize("backend, filename", [("clean-fid", CLEANFID_FILE), ("torchmetrics", FIDELITY_FILE)])
def test_missing_inception_is_explained_before_any_work(backend: str, filename: str, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "inception.pt"
    with pytest.raises(MissingWeights) as err:  # folders do not exist either: the weights are checked first
        compute_fid(tmp_path / "gen", tmp_path / "ref", backend, inception_path=missing)
    text = str(err.value)
    assert filename in text and "--inception PATH" in text and str(missing) in text
    assert str(library_cache_path(backend)) in text
    assert isinstance(err.value, FileNotFoundError)
    if not library_cache_path(backend).exists():  # e.g. /tmp/inception-2015-12-05.pt on a machine that has it
        with pytest.raises(MissingWeights, match="--inception PATH"):
            require_inception(backend)
    with pytest.raises(ValueError, match="backend"):
        require_inception("pytorch-fid")


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
