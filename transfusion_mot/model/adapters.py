"""Per-modality adapters: what a modality brings to the shared backbone besides its MoT group.

A discrete modality (text, VQ image codes) brings an embedding and a head with a softmax over its own
vocabulary; its loss is next-token cross-entropy (``next_token.py``). The continuous image modality of
the Transfusion setting still lives inside ``transfusion.py`` (patch in/out + timestep embedding).
"""
from __future__ import annotations

import torch
import torch.nn as nn


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
