"""The Transfusion model: text ids and noised latent patches in one sequence, one MoT backbone, and a
per-modality adapter list (``adapters.py``): text's embedding + LM head on text positions, the image's
patch in / timestep embedding / velocity head on image positions, plug-ins' own. The network only predicts;
noising, targets and losses live in flow.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..config import ModelConfig
from .adapters import ContinuousAdapter, DiscreteAdapter, build_adapter
from .inputs import IMAGE, TEXT, ModelInput
from .layers import patch_counts
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


# Parameter names before the modalities became one adapter list (issue 21): saved runs, exported folders and
# checkpoints of older versions use them; ``current_name`` maps them, in this one place.
LEGACY_NAMES = (("tok_emb.", "adapters.0.emb."), ("lm_head.", "adapters.0.head."), ("patch_in.", "adapters.1.inp."),
                ("t_emb.", "adapters.1.t_emb."), ("patch_out.", "adapters.1.out."))


def current_name(name: str) -> str:
    """A parameter / buffer name of an older Transfusion model -> today's (``extra.k.`` -> ``adapters.2+k.``);
    today's names pass unchanged."""
    for old, new in LEGACY_NAMES:
        if name.startswith(old):
            return new + name[len(old):]
    if name.startswith("extra."):
        k, rest = name[len("extra."):].split(".", 1)
        return f"adapters.{2 + int(k)}.{rest}"
    return name


def _upgrade_names(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: an older model's keys renamed in place (``current_name``)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        new = prefix + current_name(key[len(prefix):])
        if new != key:
            state_dict[new] = state_dict.pop(key)


class Transfusion(nn.Module):
    """``adapters[m]`` brings modality m in and out of the backbone: text (0) a DiscreteAdapter (embedding +
    LM head), image (1) a ContinuousAdapter (patch in / out + timestep embedding), plug-ins 2, 3, ... their
    registered adapters; ``embed`` and ``heads`` run one loop over them."""

    _embedding_names = ("adapters.0.",)  # the text embedding and LM head: left out of num_params(embeddings=False)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("model.vocab_size must be set (build_model fills it from the tokenizer)")
        self.cfg = cfg
        dim = cfg.backbone.dim
        patch_dim = cfg.latent_channels * cfg.patch_size ** 2
        image = ContinuousAdapter(patch_dim, dim, grid_pos=cfg.image_pos == "sincos2d")
        self.adapters = nn.ModuleList([DiscreteAdapter(cfg.vocab_size, dim), image,
                                       *(build_adapter(name, dim) for name in cfg.extra_modalities)])
        self.backbone = Backbone(cfg.backbone, cfg.n_groups, cfg.moe)
        self.register_load_state_dict_pre_hook(_upgrade_names)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():  # the order below: a seed gives the weights it always gave
            if p.dim() == 2:
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        for adapter in self.adapters:
            getattr(adapter, "reset_output", lambda: None)()  # image: start by predicting zero velocity (DiT)

    # The parameters' order before the adapter list: text embedding, patch in, timestep MLP, backbone, LM
    # head, patch out, plug-ins. Initialisation draws in it and the gradient norm (clipping) sums in it, so
    # a seed trains bit for bit as it did; the state dict keeps the modules' own order.
    _ORDER = ("adapters.0.emb.", "adapters.1.inp.", "adapters.1.t_emb.", "backbone.", "adapters.0.head.",
              "adapters.1.out.")

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        items = list(super().named_parameters(prefix, recurse, remove_duplicate))
        cut = len(prefix) + 1 if prefix else 0

        def rank(item) -> int:
            local = item[0][cut:]
            return next((i for i, start in enumerate(self._ORDER) if local.startswith(start)), len(self._ORDER))

        return iter(sorted(items, key=rank))  # stable: the modules' order within each part

    # -- the three stages of forward, public so that sampling can run them with a KV cache --
    def embed(self, batch: ModelInput) -> torch.Tensor:
        """(B, T, D): each position embedded by its modality's adapter (discrete ids, or continuous vectors
        with their flow time)."""
        b, t = batch.tokens.shape
        flat_mod = batch.modality.reshape(-1)
        x = None
        for m, adapter in enumerate(self.adapters):
            idx = (flat_mod == m).nonzero().squeeze(1)
            if adapter.kind == "discrete":
                emb = adapter.embed(batch.tokens.reshape(-1)[idx])  # (N_m, D)
            elif idx.numel():
                values, time, *spans = self._continuous(m, batch)
                if idx.numel() != values.shape[0]:
                    raise ValueError(f"batch has {idx.numel()} positions of modality {m} but {values.shape[0]} "
                                     f"continuous inputs")
                emb = adapter.embed(values.to(x.dtype), time, *spans).to(x.dtype)  # (N_m, D)
            else:
                continue
            x = emb.new_zeros(b * t, emb.shape[-1]) if x is None else x
            x = x.index_copy(0, idx, emb)
        return x.reshape(b, t, -1)

    def _continuous(self, m: int, batch: ModelInput) -> tuple:
        """The arguments of continuous modality m's ``adapter.embed``: the image's flat patches, one time per
        image, each image's patch count and grid width; a plug-in's vectors with one time per position."""
        if m == IMAGE:
            p = self.cfg.patch_size
            return batch.patches, batch.t, patch_counts(batch.image_shape, p), batch.image_shape[:, 2] // p
        return batch.values[m], batch.time[m]

    def uses_flex(self, device: torch.device) -> bool:
        """``model.attention``: flex, or auto on CUDA (else SDPA with a boolean mask)."""
        return self.cfg.attention == "flex" or (self.cfg.attention == "auto" and torch.device(device).type == "cuda")

    def attention_mask(self, batch: ModelInput):
        if self.uses_flex(batch.tokens.device):
            return flex_block_mask(batch.doc_id, batch.image_id)
        return mask_from_batch(batch.doc_id, batch.image_id)

    def heads(self, h: torch.Tensor, batch: ModelInput) -> Outputs:
        """A discrete modality's logits at its non-padding positions, a continuous one's prediction (the
        velocity) at all of its positions; the text logits and the image velocity fill ``Outputs``."""
        b, t, d = h.shape
        flat, flat_mod = h.reshape(b * t, d), batch.modality.reshape(-1)
        logits, index, values = {}, {}, {}
        for m, adapter in enumerate(self.adapters):
            at = flat_mod == m
            if adapter.kind == "discrete":
                index[m] = (at & (batch.doc_id.reshape(-1) >= 0)).nonzero().squeeze(1)
                logits[m] = adapter.logits(flat[index[m]])  # (N_m, V_m)
            else:
                values[m] = adapter.predict(flat[at.nonzero().squeeze(1)])  # (N_m, d_m), in sequence order
        velocity = values.pop(IMAGE)  # (P, C*p*p), image after image like batch.patches
        return Outputs(logits[TEXT], index[TEXT], velocity, h, self.backbone.aux_loss().to(h.device), values)

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
