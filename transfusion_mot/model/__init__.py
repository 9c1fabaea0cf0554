"""The network: MoT backbone (mot.py, modality.py), mask, layers and the Transfusion model."""
from __future__ import annotations

import dataclasses

from ..config import ModelConfig
from .modality import PerModality, Routing, untie_from_dense
from .mot import Backbone, BackboneConfig, KVCache
from .sizes import SIZES
from .transfusion import Outputs, Transfusion


def build_model(cfg: ModelConfig, vocab_size: int | None = None) -> Transfusion:
    """The model for a config; ``vocab_size`` (from the tokenizer) fills ``cfg.vocab_size`` when 0."""
    if not cfg.vocab_size:
        if not vocab_size:
            raise ValueError("model.vocab_size is 0 and no tokenizer vocabulary size was given")
        cfg = dataclasses.replace(cfg, vocab_size=vocab_size)
    return Transfusion(cfg)


__all__ = ["Backbone", "BackboneConfig", "KVCache", "Outputs", "PerModality", "Routing", "SIZES",
           "Transfusion", "build_model", "untie_from_dense"]
