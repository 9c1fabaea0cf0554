"""Per-modality adapters: what a modality brings to the shared backbone besides its MoT group.

A discrete modality (text, VQ image codes) brings an embedding and a head with a softmax over its own
vocabulary; its loss is next-token cross-entropy (``next_token.py``). A continuous one brings a linear
map in, a timestep embedding of its flow time and a zero-initialised linear map out (the velocity); its
loss is the flow loss (``flow.py``). The Transfusion model holds text (id 0, discrete) and image (id 1,
continuous patches) adapters; further modalities are plug-ins: ``register_modality(name, make)`` and
``model.extra_modalities=[name]`` give them ids 2, 3, ... and a MoT group each.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from .layers import TimestepEmbedding, grid_sincos

# name -> make(model dim) -> adapter, for model.extra_modalities (a test or a user's own module registers)
MODALITIES: dict[str, Callable[[int], nn.Module]] = {}


def register_modality(name: str, make: Callable[[int], nn.Module]) -> None:
    """Make a plug-in modality buildable by name: ``make(dim)`` returns its adapter."""
    if not name or name in ("text", "image"):
        raise ValueError(f"a plug-in modality needs a name other than text / image, got {name!r}")
    MODALITIES[name] = make


def build_adapter(name: str, dim: int) -> nn.Module:
    if name not in MODALITIES:
        raise ValueError(f"model.extra_modalities names {name!r}, which no module registered "
                         f"(model.adapters.register_modality); registered: {sorted(MODALITIES)}")
    return MODALITIES[name](dim)


class DiscreteAdapter(nn.Module):
    """Embedding of a discrete modality's ids and the head that predicts them (no weight tying)."""

    kind = "discrete"

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        if vocab_size < 1:
            raise ValueError(f"a discrete adapter needs a vocabulary size >= 1, got {vocab_size}")
        self.vocab_size = vocab_size
        self.emb = nn.Embedding(vocab_size, dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:  # (N,) long -> (N, D)
        return self.emb(ids)

    def logits(self, h: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N, V)
        return self.head(h)


class ContinuousAdapter(nn.Module):
    """Continuous vectors (a patch, a frame) in and their predicted velocity out, with the flow time
    embedded and added at every position (Transfusion's patch in/out + timestep embedding)."""

    kind = "continuous"

    def __init__(self, in_dim: int, dim: int, grid_pos: bool = False):
        super().__init__()
        if in_dim < 1:
            raise ValueError(f"a continuous adapter needs an input width >= 1, got {in_dim}")
        if grid_pos and dim % 4:
            raise ValueError(f"a 2-D sin-cos position needs a model width divisible by 4, got {dim}")
        self.in_dim = in_dim
        self.grid_pos = grid_pos  # add each vector's (row, column) in its span's grid (model.image_pos=sincos2d)
        self.inp = nn.Linear(in_dim, dim)
        self.t_emb = TimestepEmbedding(dim)
        self.out = nn.Linear(dim, in_dim)

    def reset_output(self) -> None:
        nn.init.zeros_(self.out.weight)  # predict zero velocity at the start (DiT's final layer)

    def embed(self, values: torch.Tensor, time: torch.Tensor, counts: torch.Tensor | None = None,
              widths: torch.Tensor | None = None) -> torch.Tensor:
        """(N, d) vectors at flow times ``time`` -> (N, D). ``time`` is (N,) per vector, or (S,) per span of
        ``counts`` (S,) vectors (an image's patches): the timestep MLP then runs once per span. ``widths``
        (S,): each span's grid width (patches per row, raster order), for the 2-D position when ``grid_pos``."""
        t_emb = self.t_emb(time).to(values.dtype)
        if counts is not None:
            t_emb = t_emb.repeat_interleave(counts, dim=0, output_size=values.shape[0])
        x = self.inp(values) + t_emb
        if self.grid_pos:
            if counts is None or widths is None:
                raise ValueError("a 2-D patch position needs each span's patch count and grid width")
            x = x + grid_sincos(counts, widths, x.shape[-1]).to(x.dtype)
        return x

    def predict(self, h: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N, d)
        return self.out(h)
