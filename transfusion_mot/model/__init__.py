"""The network: MoT backbone (mot.py, modality.py), mask, layers and the Transfusion model."""
from __future__ import annotations

import dataclasses

from ..config import BackboneConfig, ModelConfig
from .chameleon import Chameleon, TokenOutputs
from .modality import PerModality, Routing, untie_from_dense
from .mot import Backbone, KVCache
from .sizes import SIZES
from .transfusion import Outputs, Transfusion


VOCAB_MULTIPLE = 64  # embedding / LM-head rows rounded up to this: matmul kernels like aligned shapes


def padded_vocab(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """``n`` rounded up to a multiple of ``multiple``."""
    return -(-int(n) // multiple) * multiple


def model_vocab_size(cfg: ModelConfig, tokenizer_vocab: int | None = None) -> int:
    """Rows of the embedding and LM head: the tokenizer's vocabulary (every id it can emit, specials
    included) rounded up to a multiple of 64, or ``model.vocab_size`` when set, which must hold every
    tokenizer id. The extra rows are never targets; sampling never picks them (``Specials.vocab``)."""
    if cfg.vocab_size:
        if tokenizer_vocab and cfg.vocab_size < tokenizer_vocab:
            raise ValueError(f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's vocabulary of "
                             f"{tokenizer_vocab} ids (BOI/EOI/pad included); set model.vocab_size=0 to take it "
                             f"from the tokenizer ({padded_vocab(tokenizer_vocab)})")
        return cfg.vocab_size
    if not tokenizer_vocab:
        raise ValueError("model.vocab_size is 0 and no tokenizer vocabulary size was given")
    return padded_vocab(tokenizer_vocab)


def build_model(cfg: ModelConfig, vocab_size: int | None = None) -> Transfusion | Chameleon:
    """The model for a config (``model.setting``); ``vocab_size`` is the tokenizer's (``model_vocab_size``
    says what is built)."""
    cls = Chameleon if cfg.setting == "chameleon" else Transfusion
    return cls(dataclasses.replace(cfg, vocab_size=model_vocab_size(cfg, vocab_size)))


__all__ = ["Backbone", "BackboneConfig", "Chameleon", "TokenOutputs", "KVCache", "Outputs", "PerModality", "Routing", "SIZES",
           "Transfusion", "build_model", "model_vocab_size", "padded_vocab", "untie_from_dense"]
