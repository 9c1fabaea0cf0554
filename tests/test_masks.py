"""The Transfusion mask on hand-built sequences, and flex == SDPA: on CPU eager and compiled (forward; torch
has no flex backward on CPU, so the backbone's CPU training fallback is checked instead), and on CUDA."""
import unittest.mock

import pytest
import torch

from transfusion_mot.model import Backbone, BackboneConfig, mot
from transfusion_mot.model.masks import additive_mask, mask_from_batch, transfusion_mask

# one row: doc 0 = [t t BOI i0 i0 i0 EOI t], doc 1 = [t i1 i1 t], then 2 padding
DOC = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, -1, -1]])
IMG = torch.tensor([[-1, -1, -1, 0, 0, 0, -1, -1, -1, 1, 1, -1, -1, -1]])


def test_text_is_causal():
    m = mask_from_batch(DOC, IMG)[0, 0]
    assert m[1, 0] and not m[0, 1]  # text sees the past, not the future
    assert not m[2, 3]  # BOI does not see the image after it
    assert not m[6, 7] and m[7, 6]


def test_image_patches_see_each_other_both_ways():
    m = mask_from_batch(DOC, IMG)[0, 0]
    for i in (3, 4, 5):
        for j in (3, 4, 5):
            assert m[i, j]
        assert m[i, 0] and m[i, 2]  # and the text before (the caption, BOI)
        assert not m[i, 6] and not m[i, 7]  # not the text after
    assert m[6, 3] and m[6, 5]  # EOI and later text see the whole image


def test_nothing_crosses_documents():
    m = mask_from_batch(DOC, IMG)[0, 0]
    assert not m[8:12, :8].any() and not m[:8, 8:12].any()
    assert m[9, 10] and m[10, 9]  # image of doc 1 is bidirectional too


def test_padding_is_isolated():
    m = mask_from_batch(DOC, IMG)[0, 0]
    assert not m[:12, 12:].any()  # nobody sees padding
    assert m[12:, :].sum() == 2 and m[12, 12] and m[13, 13]  # padding sees only itself (finite rows)


def test_kv_cache_mask_equals_slice_of_full_mask():
    full = mask_from_batch(DOC, IMG)
    pos = torch.arange(14)[None]
    q = slice(9, 12)
    part = transfusion_mask(DOC[:, q], IMG[:, q], pos[:, q], DOC, IMG, pos)
    assert torch.equal(part, full[:, :, q])


def test_backbone_converts_the_boolean_mask_once_and_computes_the_same():
    """Backbone turns the boolean mask into SDPA's 0 / -inf form once per batch: the same numbers as SDPA's
    own per-call conversion; under autocast the float32 mask serves bf16 queries."""
    mask = mask_from_batch(DOC, IMG)
    add = additive_mask(mask, torch.float32)
    assert torch.equal(add, torch.where(mask, 0.0, float("-inf")))
    torch.manual_seed(0)
    bb = Backbone(BackboneConfig(dim=32, n_layers=2, n_heads=4), n_groups=2)
    x = torch.randn(1, 14, 32)
    modality = (IMG >= 0).long()
    pos = torch.arange(14)[None]
    ours = bb(x, modality, pos, mask)
    with unittest.mock.patch.object(mot, "additive_mask", lambda m, dtype: m):  # hand SDPA the boolean mask
        assert torch.equal(ours, bb(x, modality, pos, mask))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = bb(x, modality, pos, mask)
    torch.testing.assert_close(low.float(), ours, atol=0.1, rtol=0.1)


def _packed(device: str, b: int = 2, t: int = 256):
    """Two documents with an image each and trailing padding, as ids (B, T)."""
    doc = torch.cat([torch.zeros(b, 100), torch.ones(b, 120), -torch.ones(b, t - 220)], 1).long().to(device)
    img = torch.full((b, t), -1, device=device)
    img[:, 20:84] = 0
    img[:, 130:194] = 1
    return doc, img


def _flex_vs_sdpa(device: str, compiled: bool) -> None:
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import flex_attention

    from transfusion_mot.model.masks import flex_block_mask

    torch.manual_seed(0)
    doc, img = _packed(device)
    q, k, v = (torch.randn(2, 4, 256, 32, device=device) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_from_batch(doc, img))
    flex = torch.compile(flex_attention) if compiled else flex_attention
    out = flex(q, k, v, block_mask=flex_block_mask(doc, img))
    torch.testing.assert_close(out, ref, atol=2e-5 if device == "cpu" else 2e-3, rtol=2e-3)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_flex_matches_sdpa_on_cpu(compiled):
    """Forward on CPU: eager (flex's dense reference path) and under torch.compile (inductor's CPU flex kernel)."""
    with torch.no_grad():
        _flex_vs_sdpa("cpu", compiled)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex attention's CUDA kernels need a CUDA GPU")
def test_flex_matches_sdpa_on_cuda():
    _flex_vs_sdpa("cuda", compiled=True)


def test_flex_cache_mask_is_the_training_rule_for_new_queries():
    """The KV-cache BlockMask (new queries at columns offset.. against every key) is the slice of the full
    training mask, as the boolean cache mask is."""
    from transfusion_mot.model.masks import dense_mask, flex_block_mask

    doc, img = _packed("cpu", b=1, t=240)
    full = mask_from_batch(doc, img)
    for start, stop in ((0, 240), (130, 194), (199, 200), (230, 240)):
        part = flex_block_mask(doc[:, start:stop], img[:, start:stop], doc[:, :stop], img[:, :stop], q_offset=start)
        assert torch.equal(dense_mask(part), full[:, :, start:stop, :stop]), (start, stop)


def test_flex_backward_on_cpu_and_the_backbone_fallback():
    """What torch does with flex's backward on CPU, tested either way: where it runs, it must match SDPA;
    where it refuses (torch 2.14: NotImplementedError), the backbone trains through SDPA over the same rule,
    with SDPA's exact gradients, and still runs flex for forward-only passes."""
    from torch.nn.attention.flex_attention import flex_attention

    from transfusion_mot.model.masks import flex_backward_runs, flex_block_mask

    doc = torch.tensor([[0] * 50 + [1] * 60 + [-1] * 18])
    img = torch.full((1, 128), -1)
    img[:, 10:40], img[:, 70:100] = 0, 1
    block_mask = flex_block_mask(doc, img)
    q = torch.randn(1, 2, 128, 8, requires_grad=True)
    if flex_backward_runs("cpu"):
        flex_attention(q, q, q, block_mask=block_mask).sum().backward()
        grad_flex, q.grad = q.grad, None
        torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask_from_batch(doc, img)).sum().backward()
        torch.testing.assert_close(grad_flex, q.grad, atol=1e-5, rtol=1e-4)
    else:
        with pytest.raises(NotImplementedError):
            flex_attention(q, q, q, block_mask=block_mask)
    torch.manual_seed(0)
    bb = Backbone(BackboneConfig(dim=32, n_layers=2, n_heads=4), n_groups=2)
    x = torch.randn(1, 128, 32, requires_grad=True)
    modality, pos = (img >= 0).long(), torch.arange(128)[None]
    grads = []
    for mask in (mask_from_batch(doc, img), block_mask):
        bb(x, modality, pos, mask).pow(2).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in bb.parameters()])
        bb.zero_grad()
        x.grad = None
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    with torch.no_grad(), unittest.mock.patch.object(mot, "dense_mask", side_effect=AssertionError("fallback")):
        torch.testing.assert_close(bb(x, modality, pos, block_mask), bb(x, modality, pos, mask_from_batch(doc, img)),
                                   atol=1e-5, rtol=1e-5)  # no gradients needed: flex itself
