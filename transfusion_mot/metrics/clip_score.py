"""CLIP score (Hessel et al. 2021, as torchmetrics computes it) with a CLIP model by hub id or local folder.

torchmetrics' own loader accepts only a few hub ids (a local folder is rejected) and, with transformers 5,
``CLIPModel.get_*_features`` return a ``BaseModelOutputWithPooling`` instead of the projected embedding
that torchmetrics normalises. So we hand torchmetrics a loader callable (its documented extension point)
that returns the model behind a small adapter exposing the projected embeddings as tensors.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from . import MissingWeights

DEFAULT_CLIP = "openai/clip-vit-large-patch14"


class _ProjectedCLIP(nn.Module):
    """A CLIPModel whose ``get_image_features`` / ``get_text_features`` return the projected (B, D) tensor."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip
        self.config = clip.config  # torchmetrics reads text_config.max_position_embeddings to truncate

    @staticmethod
    def _embedding(out: object) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 4 vs 5

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._embedding(self.clip.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._embedding(self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") != 1 or Path(name).exists()


def require_clip(model_path: str | Path = DEFAULT_CLIP) -> str:
    """The model folder or hub id to load; raises ``MissingWeights`` if it cannot be had. Call it first."""
    name = str(model_path)
    if _looks_like_path(name):
        folder = Path(name).expanduser()
        if (folder / "config.json").is_file():
            return str(folder)
        raise MissingWeights(f"CLIP model folder {folder} has no config.json (a transformers CLIPModel saved with "
                             "save_pretrained, with its CLIPProcessor); pass a valid folder with --clip PATH")
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    if constants.HF_HUB_OFFLINE and not isinstance(cached, str):
        raise MissingWeights(
            f"CLIP model {name} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub is offline "
            f"(HF_HUB_OFFLINE=1). Download it on a machine with network (huggingface-cli download {name}) into that "
            "cache, or save it with save_pretrained and pass the folder with --clip PATH")
    return name


def load_clip(model_path: str | Path = DEFAULT_CLIP) -> tuple[nn.Module, object]:
    """(model adapter, CLIPProcessor), in the form torchmetrics' ``model_name_or_path`` callable returns."""
    from transformers import CLIPModel, CLIPProcessor

    name = require_clip(model_path)
    model = CLIPModel.from_pretrained(name).eval()
    return _ProjectedCLIP(model), CLIPProcessor.from_pretrained(name)


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """CLIP processors rescale by 1/255 themselves, so hand them 0..255 pixels, rounded, not [0, 1] floats."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
    if images.is_floating_point():
        if images.min() < 0 or images.max() > 1:
            raise ValueError(f"float images must lie in [0, 1], got [{images.min():.3f}, {images.max():.3f}]")
        return (images * 255).round().to(torch.uint8)
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be float in [0, 1] or uint8, got {images.dtype}")
    return images


@torch.no_grad()
def clip_score(images: torch.Tensor, prompts: Sequence[str], model_path: str | Path = DEFAULT_CLIP,
               batch_size: int = 16) -> float:
    """Mean CLIP score, 100 * cos(image, prompt) floored at 0, over (N, 3, H, W) images in [0, 1]."""
    from ..extras import require

    CLIPScore = require("torchmetrics.multimodal", "eval").CLIPScore

    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts: they must pair up one to one")
    if len(prompts) == 0:
        raise ValueError("clip_score needs at least one image/prompt pair")
    pixels = _to_uint8(images)
    model, processor = load_clip(model_path)
    metric = CLIPScore(model_name_or_path=lambda: (model, processor))
    for start in range(0, len(prompts), batch_size):
        metric.update(pixels[start:start + batch_size], list(prompts[start:start + batch_size]))
    return float(metric.compute())
