"""The Transfusion model: text ids and noised latent patches in one sequence, one MoT backbone, an LM
head on text positions and a velocity head on image positions. The network only predicts; noising,
targets and losses live in flow.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..config import ModelConfig
from .adapters import build_adapter
from .inputs import IMAGE, TEXT, ModelInput
from .layers import TimestepEmbedding, patch_counts
from .masks import flex_block_mask, mask_from_batch
from .mot import Backbone, KVCache


@dataclass
class Outputs:
    logits: torch.Tensor  # (N_text, V) at the flattened non-padding text positions `text_index`
    text_index: torch.Tensor  # (N_text,) indices into the flattened (B*T) sequence
    velocity: torch.Tensor  # (P, C*p*p) predicted noise - x0 per patch, laid out as Batch.patches
    hidden: torch.Tensor  # (B, T, D) final hidden states (after the per-modality norm)
    aux_loss: torch.Tensor  # () MoE auxiliary loss (0 unless MoE in training: mot.MoEFeedForward)
    values: dict[int, torch.Tensor] = field(default_factory=dict)  # plug-in m -> (N_m, d_m) velocities


class Transfusion(nn.Module):
    _embedding_names = ("tok_emb", "lm_head")  # left out of num_params(embeddings=False)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("model.vocab_size must be set (build_model fills it from the tokenizer)")
        self.cfg = cfg
        patch_dim = cfg.latent_channels * cfg.patch_size ** 2
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.backbone.dim)
        self.patch_in = nn.Linear(patch_dim, cfg.backbone.dim)
        self.t_emb = TimestepEmbedding(cfg.backbone.dim)
        self.backbone = Backbone(cfg.backbone, cfg.n_groups, cfg.moe)
        self.lm_head = nn.Linear(cfg.backbone.dim, cfg.vocab_size, bias=False)
        self.patch_out = nn.Linear(cfg.backbone.dim, patch_dim)
        # plug-in modalities 2, 3, ... (model.extra_modalities), built by name from adapters.MODALITIES
        self.extra = nn.ModuleList(build_adapter(name, cfg.backbone.dim) for name in cfg.extra_modalities)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        nn.init.zeros_(self.patch_out.weight)  # start by predicting zero velocity (DiT's final layer)
        for adapter in self.extra:
            getattr(adapter, "reset_output", lambda: None)()

    # -- the three stages of forward, public so that sampling can run them with a KV cache --
    def embed(self, batch: ModelInput) -> torch.Tensor:
        """(B, T, D): token embeddings, with patch + timestep embeddings written at image positions."""
        x = self._embed_extra(self.tok_emb(batch.tokens), batch)
        if batch.n_images == 0:
            return x
        n_patches = batch.patches.shape[0]
        img_idx = (batch.modality == IMAGE).reshape(-1).nonzero().squeeze(1)
        if img_idx.numel() != n_patches:
            raise ValueError(f"batch has {img_idx.numel()} image positions but {n_patches} latent patches")
        counts = patch_counts(batch.image_shape, self.cfg.patch_size)  # (N,) each image's own size
        t_emb = self.t_emb(batch.t).to(x.dtype).repeat_interleave(counts, dim=0, output_size=n_patches)  # (P, D)
        patches = self.patch_in(batch.patches.to(x.dtype)) + t_emb  # (P, D)
        b, t, d = x.shape
        return x.reshape(b * t, d).index_copy(0, img_idx, patches).reshape(b, t, d)

    def _embed_extra(self, x: torch.Tensor, batch: ModelInput) -> torch.Tensor:
        """Plug-in modality m = 2 + k: adapter k embeds ``batch.values[m]`` at times ``batch.time[m]``."""
        b, t, d = x.shape
        for k, adapter in enumerate(self.extra):
            idx = (batch.modality == 2 + k).reshape(-1).nonzero().squeeze(1)
            if idx.numel():
                emb = adapter.embed(batch.values[2 + k].to(x.dtype), batch.time[2 + k])  # (N_m, D)
                x = x.reshape(b * t, d).index_copy(0, idx, emb.to(x.dtype)).reshape(b, t, d)
        return x

    def uses_flex(self, device: torch.device) -> bool:
        """``model.attention``: flex, or auto on CUDA (else SDPA with a boolean mask)."""
        return self.cfg.attention == "flex" or (self.cfg.attention == "auto" and torch.device(device).type == "cuda")

    def attention_mask(self, batch: ModelInput):
        if self.uses_flex(batch.tokens.device):
            return flex_block_mask(batch.doc_id, batch.image_id)
        return mask_from_batch(batch.doc_id, batch.image_id)

    def heads(self, h: torch.Tensor, batch: ModelInput) -> Outputs:
        b, t, d = h.shape
        flat = h.reshape(b * t, d)
        text_index = ((batch.modality == TEXT) & (batch.doc_id >= 0)).reshape(-1).nonzero().squeeze(1)
        logits = self.lm_head(flat[text_index])
        img_idx = (batch.modality == IMAGE).reshape(-1).nonzero().squeeze(1)
        velocity = self.patch_out(flat[img_idx])  # (P, C*p*p), image after image like batch.patches
        values = {2 + k: adapter.predict(flat[(batch.modality == 2 + k).reshape(-1)])  # (N_m, d_m)
                  for k, adapter in enumerate(self.extra)}
        return Outputs(logits, text_index, velocity, h, self.backbone.aux_loss().to(h.device), values)

    def forward(self, batch: ModelInput, mask=None, cache: KVCache | None = None) -> Outputs:
        """``batch.patches`` are the (noised) model inputs, image i at time ``batch.t[i]``."""
        x = self.embed(batch)
        mask = self.attention_mask(batch) if mask is None else mask
        h = self.backbone(x, batch.modality, batch.position, mask, cache=cache, doc_id=batch.doc_id)
        return self.heads(h, batch)

    # -- bookkeeping --
    def num_params(self, active: bool = False, embeddings: bool = True) -> int:
        """Total parameters, or those one token uses (``active``: one MoT group, one MoE expert)."""
        total = 0
        for name, p in self.named_parameters():
            if not embeddings and name.startswith(self._embedding_names):
                continue
            n = p.numel()
            if active and ".groups." in name:
                n //= len(self._group_list(name))
            if active and ".experts." in name:
                n //= self.cfg.backbone.moe_experts
            total += n
        return total

    def _group_list(self, name: str) -> nn.ModuleList:
        module = self
        parts = name.split(".")
        for part in parts[: parts.index("groups") + 1]:
            module = getattr(module, part) if not part.isdigit() else module[int(part)]
        return module
