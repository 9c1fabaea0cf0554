"""The data contract: every source produces examples made of these segments (DESIGN §4).

An example is a list of segments, e.g. ``[Text(caption_ids), Image(latent)]`` for caption-first
generation or ``[Image(latent), Text(caption_ids)]`` for captioning. ``pack()`` turns examples into a
``Batch`` of flat tensors; nothing downstream of packing knows where an example came from.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from PIL import Image as PILImage


@dataclass
class Record:
    """One raw captioned image as a source yields it, before tokenising and encoding."""

    image: PILImage.Image | None  # RGB; None: a record of plug-in segments and text only (speech + transcript)
    captions: list[str]  # one or more; a pipeline picks one per epoch
    key: str = ""  # file name / shard key, for error messages and caching
    meta: dict = field(default_factory=dict)  # source-specific extras (shapes: the scene facts)
    # plug-in segments (``Continuous`` subclasses of model.extra_modalities) a user's source attaches; they are
    # packed after the image, in this order, with t / noise keyed by the example's data position
    extras: list = field(default_factory=list)


@dataclass
class Text:
    ids: list[int]


@dataclass
class Image:
    """An image segment: a clean VAE latent (C, h, w). ``conditions_text`` marks captioning images."""

    latent: torch.Tensor  # (C, h, w), already scaled by the codec
    conditions_text: bool = False


@dataclass
class ImageTokens:
    """A discrete image segment (the Chameleon setting): VQ code ids (h, w), packed row-major between
    BOI and EOI as causal tokens of the image modality, predicted like text (one next-token loss)."""

    ids: torch.Tensor  # (h, w) long, in [0, codebook size)
    conditions_text: bool = False


@dataclass
class Continuous:
    """A plug-in continuous segment: vectors (n, d) of the modality named ``modality`` (a subclass sets
    it; ``model.extra_modalities`` lists it), packed as one bidirectional span between BOI and EOI and
    trained with the flow loss like an image (a speech clip's frames, a toy 1-D signal's frames)."""

    modality: ClassVar[str] = ""
    values: torch.Tensor  # (n, d) float


Example = list  # list[Text | Image | ImageTokens | Continuous]
