"""Feature networks for ``compute_fd``: a CIFAR ResNet-56 (reported as ``FD-resnet56``) and the Inception.

The ResNet-56 (He et al. 2016, CIFAR variant with option-A shortcuts) is our own implementation with the
key layout of ``shared/assets/features/resnet56-cifar10.th`` (see its MANIFEST). It is a small real
feature space for tests and quick comparisons; its distance is never FID.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import MissingWeights

FEATURE_NETS = ("resnet56", "inception")
CIFAR_MEAN = (0.485, 0.456, 0.406)  # the normalisation the checkpoint was trained with (MANIFEST)
CIFAR_STD = (0.229, 0.224, 0.225)


class FeatureNet(nn.Module):
    """Maps RGB uint8 images (B, 3, H, W) of any size to (B, D) features; resizing is its own business."""

    name: str = "features"

    @property
    def metric_name(self) -> str:
        return f"FD-{self.name}"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers; the shortcut has no parameters (option A: subsample, zero-pad channels)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.stride, self.pad = stride, out_ch - in_ch

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))  # zero channels on both sides

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet56(nn.Module):
    """CIFAR ResNet-56: a 16-channel stem, then 3 stages of 9 blocks (16, 32, 64 channels), then a linear head."""

    def __init__(self, num_classes: int = 10, blocks_per_stage: int = 9) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        widths = (16, 32, 64)
        stages, in_ch = [], 16
        for i, width in enumerate(widths):
            blocks = [BasicBlock(in_ch if j == 0 else width, width, 2 if (i > 0 and j == 0) else 1)
                      for j in range(blocks_per_stage)]
            stages.append(nn.Sequential(*blocks))
            in_ch = width
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(widths[-1], num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 32, 32) normalised -> (B, 64)
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))  # (B, 64, 8, 8)
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 10) logits
        return self.linear(self.features(x))


def load_resnet56(path: str | Path) -> ResNet56:
    """Strictly load the akamaster CIFAR-10 checkpoint (``{"state_dict": {"module.<key>": ...}}``)."""
    path = Path(path)
    if not path.is_file():
        raise MissingWeights(f"ResNet-56 weights not found: {path} (resnet56-cifar10.th, see "
                             "shared/assets/MANIFEST.md); pass the file with --features-weights PATH")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict (or a dict with 'state_dict'), got {type(blob).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    net = ResNet56()
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path} is not a CIFAR ResNet-56 checkpoint: {' '.join(str(err).split())}") from None
    return net.eval()


class ResNet56Features(FeatureNet):
    """64-d pooled ResNet-56 features of images resized to 32x32 (bicubic, antialiased) and normalised."""

    name = "resnet56"

    def __init__(self, net: ResNet56) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CIFAR_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images_u8: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) uint8 -> (B, 64)
        x = images_u8.float() / 255.0
        if x.shape[-2:] != (32, 32):
            x = F.interpolate(x, size=(32, 32), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        return self.net.features((x - self.mean) / self.std)


def build_feature_extractor(name: str, path: str | Path | None = None) -> FeatureNet:
    """The ``--features`` network by name: "resnet56" (weights file required) or "inception" (FID)."""
    if name == "resnet56":
        if path is None:
            raise MissingWeights("--features resnet56 needs its weights file (resnet56-cifar10.th); "
                                 "pass it with --features-weights PATH")
        return ResNet56Features(load_resnet56(path))
    if name == "inception":
        from .fid import InceptionFeatures

        return InceptionFeatures(path)
    raise ValueError(f"unknown feature network {name!r}; choose one of {FEATURE_NETS}")
