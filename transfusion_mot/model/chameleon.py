"""The Chameleon setting (MoT paper): text ids and discrete image codes (VQ tokenizer) in one causal
sequence, one MoT backbone routed by modality, and one next-token objective over both vocabularies.

Every position is a discrete token of some modality m, embedded by adapter m (ids in m's own id
space). ``predict`` (B, T) names the modality of the token each position predicts (-1: none); logits
are computed only there, with that modality's head: BOI predicts the first image code with the image
head, and the last code predicts EOI with the text head. The objective (``next_token.py``) derives ``predict`` from the packed targets; a sampler sets it at the
last position. The mask is the causal document mask (no bidirectional spans: image ids are -1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import ModelConfig
from .adapters import DiscreteAdapter
from .mot import Backbone, KVCache
from .transfusion import Transfusion



@dataclass
class TokenOutputs:
    logits: dict[int, torch.Tensor]  # modality m -> (N_m, V_m) logits of the positions predicting an m token
    index: dict[int, torch.Tensor]  # modality m -> (N_m,) those positions, flat indices into (B*T)
    hidden: torch.Tensor  # (B, T, D) final hidden states (after the per-modality norm)
    aux_loss: torch.Tensor  # () MoE auxiliary loss


def next_token_predict(modality: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, T): the modality of the next token wherever position i has a target (targets >= 0), else -1.
    A target exists only inside a document (never at a row's last column), so the shift never wraps."""
    nxt = torch.cat([modality[:, 1:], modality[:, :1]], 1)
    return torch.where(targets >= 0, nxt, torch.full_like(modality, -1))


class Chameleon(nn.Module):
    """Discrete adapters (text: the tokenizer's vocabulary; image: the VQ codebook) around the backbone."""

    _embedding_names = ("adapters.",)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size < 1 or cfg.image_vocab_size < 1:
            raise ValueError(f"model.vocab_size={cfg.vocab_size} and model.image_vocab_size={cfg.image_vocab_size} "
                             "must be set (build_model fills the first from the tokenizer, the config the second)")
        self.cfg = cfg
        self.adapters = nn.ModuleList([DiscreteAdapter(cfg.vocab_size, cfg.backbone.dim),
                                       DiscreteAdapter(cfg.image_vocab_size, cfg.backbone.dim)])
        self.backbone = Backbone(cfg.backbone, cfg.n_groups, cfg.moe)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=self.cfg.init_std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def embed(self, tokens: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """(B, T, D): each position embedded by its modality's adapter (ids in that modality's space)."""
        b, t = tokens.shape
        flat_tok, flat_mod = tokens.reshape(-1), modality.reshape(-1)
        x = None
        for m, adapter in enumerate(self.adapters):
            idx = (flat_mod == m).nonzero().squeeze(1)
            emb = adapter.embed(flat_tok[idx])  # (N_m, D)
            if x is None:
                x = emb.new_zeros(b * t, emb.shape[-1])
            x = x.index_copy(0, idx, emb)
        return x.reshape(b, t, -1)

    uses_flex = Transfusion.uses_flex
    attention_mask = Transfusion.attention_mask

    def heads(self, h: torch.Tensor, predict: torch.Tensor) -> TokenOutputs:
        flat = h.reshape(-1, h.shape[-1])
        flat_pred = predict.reshape(-1)
        logits, index = {}, {}
        for m, adapter in enumerate(self.adapters):
            index[m] = (flat_pred == m).nonzero().squeeze(1)
            logits[m] = adapter.logits(flat[index[m]])
        return TokenOutputs(logits, index, h, self.backbone.aux_loss().to(h.device))

    def forward(self, batch, mask=None, cache: KVCache | None = None,
                predict: torch.Tensor | None = None) -> TokenOutputs:
        """``batch``: a packed ``Batch`` (tokens, modality, doc_id, image_id, position; ``text_targets`` give
        the default ``predict``); ``predict`` (B, T) as in the module docstring."""
        x = self.embed(batch.tokens, batch.modality)
        mask = self.attention_mask(batch) if mask is None else mask
        h = self.backbone(x, batch.modality, batch.position, mask, cache=cache, doc_id=batch.doc_id)
        if predict is None:
            predict = next_token_predict(batch.modality, batch.text_targets)
        return self.heads(h, predict)

    num_params = Transfusion.num_params
    _group_list = Transfusion._group_list
