"""The Transfusion attention mask.

Token i may attend to token j iff both belong to the same document and either j comes no later than
i (causal text) or both are patches of the same image (bidirectional inside an image). Padding
(doc_id == -1) sees only itself, so its rows stay finite, and no real token ever sees padding.

Two realisations of the same rule: a boolean tensor for SDPA (any device, the CPU training path; the
backbone turns it into SDPA's additive form once per batch, ``additive_mask``) and a flex-attention
``BlockMask`` (CUDA). ``tests/test_masks.py`` checks that they agree.
"""
from __future__ import annotations

import torch


def transfusion_mask(
    q_doc: torch.Tensor,
    q_img: torch.Tensor,
    q_pos: torch.Tensor,
    k_doc: torch.Tensor | None = None,
    k_img: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean mask (B, 1, Tq, Tk), True = may attend.

    ``*_doc`` / ``*_img`` are document and image ids (-1 for padding / text); ``*_pos`` is each
    token's index in the row (absolute, so a KV cache can pass the cached keys' indices). Keys default
    to the queries (the training case).
    """
    if k_doc is None:
        k_doc, k_img, k_pos = q_doc, q_img, q_pos
    same_doc = (q_doc[:, :, None] == k_doc[:, None, :]) & (q_doc[:, :, None] >= 0)
    causal = k_pos[:, None, :] <= q_pos[:, :, None]
    same_img = (q_img[:, :, None] == k_img[:, None, :]) & (q_img[:, :, None] >= 0)
    self_ = q_pos[:, :, None] == k_pos[:, None, :]
    return ((same_doc & (causal | same_img)) | self_)[:, None]


def mask_from_batch(doc_id: torch.Tensor, image_id: torch.Tensor) -> torch.Tensor:
    """Training-time mask for a packed batch: (B, T) ids -> (B, 1, T, T)."""
    b, t = doc_id.shape
    idx = torch.arange(t, device=doc_id.device).expand(b, t)
    return transfusion_mask(doc_id, image_id, idx)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask -> 0 where True, -inf where False, in ``dtype``: what SDPA turns a boolean mask into on
    every call, so converting it once per batch saves the conversion (and a float copy) in every layer."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def flex_block_mask(doc_id: torch.Tensor, image_id: torch.Tensor):
    """The same rule as a flex-attention BlockMask (CUDA). Imported lazily: CPU runs never need it."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, t = doc_id.shape

    def mask_mod(bi, h, qi, ki):
        dq, dk = doc_id[bi, qi], doc_id[bi, ki]
        iq, ik = image_id[bi, qi], image_id[bi, ki]
        same_doc = (dq == dk) & (dq >= 0)
        return (same_doc & ((ki <= qi) | ((iq == ik) & (iq >= 0)))) | (qi == ki)

    return create_block_mask(mask_mod, B=b, H=None, Q_LEN=t, KV_LEN=t, device=doc_id.device)
