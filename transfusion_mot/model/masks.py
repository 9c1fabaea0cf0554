"""The Transfusion attention mask.

Token i may attend to token j iff both belong to the same document and either j comes no later than
i (causal text) or both are patches of the same image (bidirectional inside an image). Padding
(doc_id == -1) sees only itself, so its rows stay finite, and no real token ever sees padding.

Two realisations of the same rule: a boolean tensor for SDPA (any device; the backbone turns it into
SDPA's additive form once per batch, ``additive_mask``) and a flex-attention ``BlockMask`` (the default on
CUDA, ``model.attention=flex`` anywhere). ``tests/test_masks.py`` checks that they agree on CPU, eager and
compiled. What torch 2.14 runs: flex forward on CUDA and CPU, eager and under ``torch.compile``;
flex backward on CUDA only (on CPU it raises NotImplementedError), so a CPU step that needs gradients runs
SDPA over the same mask, materialised from the BlockMask (``flex_backward_runs``, ``dense_mask``).
"""
from __future__ import annotations

import functools

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


def flex_block_mask(doc_id: torch.Tensor, image_id: torch.Tensor, k_doc: torch.Tensor | None = None,
                    k_img: torch.Tensor | None = None, q_offset: int = 0):
    """The same rule as a flex-attention BlockMask. Training: queries are keys, ``doc_id``/``image_id``
    (B, T). A KV cache: the new queries' ids (B, Tq) against all keys' ids ``k_doc``/``k_img`` (B, Tk),
    the queries sitting at columns ``q_offset ..`` of the row (``q_offset`` = the cached length).
    Imported lazily: SDPA runs never need flex."""
    from torch.nn.attention.flex_attention import create_block_mask

    if k_doc is None:
        k_doc, k_img = doc_id, image_id
    b, tq = doc_id.shape

    def mask_mod(bi, h, qi, ki):
        col = qi + q_offset  # the query's column in the row, comparable with the key's index ki
        dq, dk = doc_id[bi, qi], k_doc[bi, ki]
        iq, ik = image_id[bi, qi], k_img[bi, ki]
        same_doc = (dq == dk) & (dq >= 0)
        return (same_doc & ((ki <= col) | ((iq == ik) & (iq >= 0)))) | (ki == col)

    return create_block_mask(mask_mod, B=b, H=None, Q_LEN=tq, KV_LEN=k_doc.shape[1], device=doc_id.device)


def is_block_mask(mask) -> bool:
    return mask is not None and not isinstance(mask, torch.Tensor)


def dense_mask(block_mask) -> torch.Tensor:
    """A BlockMask's rule as SDPA's boolean mask (B, 1, Tq, Tk), evaluated from its mask_mod."""
    from torch.nn.attention.flex_attention import create_mask

    q_len, kv_len = block_mask.seq_lengths
    return create_mask(block_mask.mask_mod, block_mask.kv_num_blocks.shape[0], None, q_len, kv_len,
                       device=block_mask.kv_num_blocks.device)


@functools.cache
def flex_backward_runs(device_type: str) -> bool:
    """Whether this torch has flex attention's backward on this device type (probed once, on a tiny
    input: torch 2.14 refuses it on CPU, so that the answer follows torch when it adds it)."""
    if device_type == "cuda":  # flex's first platform: forward and backward since torch 2.5
        return True
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q = torch.zeros(1, 1, 16, 8, device=device_type, requires_grad=True)
    mask = create_block_mask(lambda b, h, qi, ki: ki <= qi, B=None, H=None, Q_LEN=16, KV_LEN=16, device=device_type)
    try:
        flex_attention(q, q, q, block_mask=mask).sum().backward()
    except NotImplementedError:
        return False
    return True

