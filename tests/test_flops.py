"""FLOPs accounting: MoT costs what dense costs per token, the analytic count matches
torch.utils.flop_counter, and the parameter table builds every size on the meta device."""
from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from helpers import SPECIALS, debug_model
from transfusion_mot.components.flops import (measured_flops, model_flops_per_token, param_table,
                                              size_config)
from transfusion_mot.data.packing import IMAGE, pack
from transfusion_mot.data.segments import Image, Text
from transfusion_mot.model import SIZES

SEQ_LEN = 128


def full_half_image_batch(seed: int = 0, rows: int = 2):
    """Caption->image documents that fill every row exactly (no padding), half text, half patches.

    Debug latents are 8x8 with 2x2 patches: 16 patches. A caption of 12 ids gives BOS + 12 + BOI + EOI
    + EOS = 16 text tokens, so a document is 32 tokens and four of them fill a row of 128.
    """
    g = torch.Generator().manual_seed(seed)
    docs = [[Text(torch.randint(0, 256, (12,), generator=g).tolist()), Image(torch.randn(4, 8, 8, generator=g))]
            for _ in range(rows * SEQ_LEN // 32)]
    batch = pack(docs, SEQ_LEN, SPECIALS, patch_size=2)
    batch.t = torch.full((batch.n_images,), 0.5)
    assert (batch.doc_id >= 0).all() and (batch.modality == IMAGE).float().mean() == 0.5
    return batch


def test_mot_flops_per_token_equal_dense():
    batch = full_half_image_batch()
    dense, _ = debug_model("model.arch=dense")
    mot, _ = debug_model("model.arch=mot")
    assert mot.num_params() > 1.5 * dense.num_params(embeddings=False)  # really untied
    for backward in (False, True):
        assert measured_flops(mot, batch, backward) == measured_flops(dense, batch, backward) > 0


@pytest.mark.parametrize("arch", ["dense", "mot", "moe"])
def test_analytic_flops_match_flop_counter(arch):
    batch = full_half_image_batch()
    model, cfg = debug_model(f"model.arch={arch}")
    tokens = batch.tokens.numel()
    forward = model_flops_per_token(model.cfg, SEQ_LEN, training=False, text_fraction=0.5)
    measured = measured_flops(model, batch) / tokens
    assert measured == pytest.approx(forward, rel=0.02)
    # Training: the flash kernel's backward recomputes QK^T (2·D·T per layer and token), which
    # flop_counter counts and model FLOPs (PaLM's 12·L·D·T) do not.
    training = model_flops_per_token(model.cfg, SEQ_LEN, training=True, text_fraction=0.5)
    recompute = 2 * cfg.model.n_layers * cfg.model.dim * SEQ_LEN
    assert measured_flops(model, batch, backward=True) / tokens == pytest.approx(training + recompute, rel=0.02)
    assert all(p.grad is None for p in model.parameters())


def test_attention_is_counted_on_cpu():
    """SDPA on CPU runs a kernel flop_counter does not know; the count must include its T x T work."""
    batch = full_half_image_batch()
    model, _ = debug_model("model.arch=dense")
    with_attention = measured_flops(model, batch)
    cfg = model.cfg
    no_attention = (model_flops_per_token(cfg, SEQ_LEN, training=False)
                    - 4 * cfg.n_layers * cfg.dim * SEQ_LEN) * batch.tokens.numel()
    assert with_attention - no_attention == pytest.approx(
        4 * cfg.n_layers * cfg.dim * SEQ_LEN * batch.tokens.numel(), rel=0.05)


def test_flops_bad_input_is_named():
    _, cfg = debug_model()
    with pytest.raises(ValueError, match="vocab_size"):
        model_flops_per_token(cfg.model, 128)
    model = dataclasses.replace(cfg.model, vocab_size=261)
    with pytest.raises(ValueError, match="text_fraction"):
        model_flops_per_token(model, 128, text_fraction=1.5)
    with pytest.raises(ValueError, match="seq_len"):
        model_flops_per_token(model, 0)


def test_param_table_all_sizes_on_meta():
    start = time.perf_counter()
    rows = param_table()
    assert time.perf_counter() - start < 30
    assert len(rows) == 3 * len(SIZES)
    by = {(r["size"], r["arch"]): r for r in rows}
    for size in SIZES:
        dense, mot, moe = by[size, "dense"], by[size, "mot"], by[size, "moe"]
        assert mot["active"] == dense["active"] == dense["total"]
        assert mot["flops_per_token"] == dense["flops_per_token"]
        # Only the embedding side (token embedding, LM head) is shared between the groups.
        shared = mot["total"] - mot["total_nonemb"]
        assert shared == dense["total"] - dense["total_nonemb"] > 0
        assert mot["backbone"] == 2 * dense["backbone"]  # every block and the final norm, untied
        assert mot["total_nonemb"] == pytest.approx(2 * dense["total_nonemb"], rel=0.1)
        assert moe["total"] > mot["total"] and moe["active"] == pytest.approx(dense["active"], rel=0.01)
    assert by["163M", "dense"]["total"] == pytest.approx(163e6, rel=0.02)
    assert by["760M", "dense"]["seq_len"] == 4096 and by["debug", "mot"]["seq_len"] == size_config("debug", "mot")[1]


def test_chameleon_image_head_is_the_codebook_softmax():
    """In the Chameleon setting an image position's head is D x image_vocab_size (the VQ codebook's
    logits), not a patch / velocity head: the analytic count matches flop_counter on a Chameleon model."""
    from transfusion_mot.data.segments import ImageTokens
    from transfusion_mot.model.chameleon import next_token_predict

    model, cfg = debug_model("model.setting=chameleon", "codec.kind=vq", "model.patch_size=1",
                             "model.image_vocab_size=512", "data.seq_len=160", "model.latent_size=8",
                             "data.max_caption_tokens=60")
    g = torch.Generator().manual_seed(0)
    docs = [[Text(torch.randint(0, 256, (12,), generator=g).tolist()),
             ImageTokens(torch.randint(0, 512, (8, 8), generator=g))] for _ in range(4)]  # 80 tokens each
    batch = pack(docs, 160, SPECIALS, 1)
    predict = next_token_predict(batch.modality, batch.text_targets)
    assert (batch.doc_id >= 0).all() and (predict >= 0).float().mean() > 0.98  # nearly every position predicts
    text_fraction = float((predict == 0).sum() / (predict >= 0).sum())
    forward = model_flops_per_token(model.cfg, 160, training=False, text_fraction=text_fraction)
    assert measured_flops(model, batch) / batch.tokens.numel() == pytest.approx(forward, rel=0.02)
    assert model.cfg.image_vocab_size * model.cfg.dim * 2 < forward  # the codebook head is really counted
