"""Images of different sizes and aspect ratios in one packed batch (issue 21 item 2): each image keeps its
own latent shape and patch count, latents travel as one flat run of patches, and a document's losses do
not depend on what it is packed with."""
import pytest
import torch
import torch.nn as nn
from helpers import SPECIALS, debug_model

from transfusion_mot import flow, sample
from transfusion_mot.data.packing import IMAGE, document_length, pack, unpack
from transfusion_mot.data.segments import Image, Text
from transfusion_mot.model.layers import patchify_each, unpatchify_each

DOWN = 4  # the debug codec's downsampling: 64x64, 32x64 and 48x48 px give these latents


def _docs() -> list[list]:
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(0, 256, (n,), generator=g).tolist()

    def latent(h_px, w_px):
        return torch.randn(4, h_px // DOWN, w_px // DOWN, generator=g)

    return [[Text(ids(7)), Image(latent(64, 64))],  # caption -> image, 16x16 latent: 64 patches
            [Image(latent(32, 64)), Text(ids(5))],  # captioning, 8x16 (wide): 32 patches
            [Text(ids(9)), Image(latent(48, 48)), Text(ids(3))]]  # 12x12: 36 patches, text after


def _live_model():
    model, cfg = debug_model("model.arch=mot")
    torch.manual_seed(1)
    nn.init.normal_(model.adapters[1].out.weight, std=0.05)  # a velocity head that reads its input (it starts at 0)
    return model.eval(), cfg


def test_flat_patches_round_trip_at_each_images_own_size():
    docs = _docs()
    batch = pack(docs, 600, SPECIALS, patch_size=2, image_seeds=[[10], [11], [12]])
    assert batch.image_shape.tolist() == [[4, 16, 16], [4, 8, 16], [4, 12, 12]]
    assert batch.patch_counts().tolist() == [64, 32, 36] and batch.patches.shape == (132, 16)
    assert int((batch.modality == IMAGE).sum()) == 132
    assert [document_length(d, patch_size=2) for d in docs] == [2 + 7 + 66, 2 + 34 + 5, 2 + 9 + 38 + 3]
    for got, want in zip(unpack(batch, SPECIALS), docs):
        lat = [s.latent for s in got if isinstance(s, Image)][0]
        assert torch.equal(lat, [s.latent for s in want if isinstance(s, Image)][0])
    lats = [d[0].latent if isinstance(d[0], Image) else d[1].latent for d in docs]
    patches, shape = patchify_each(lats, 2)
    assert all(torch.equal(a, b) for a, b in zip(unpatchify_each(patches, shape, 2), lats))


@pytest.mark.parametrize("seq_len", [600, 160])  # all three documents in one row / 1 + 2 docs in two rows
def test_mixed_sizes_give_each_documents_losses_alone(seq_len):
    model, cfg = _live_model()
    docs, keys = _docs(), [[10], [11], [12]]
    together = pack(docs, seq_len, SPECIALS, patch_size=2, image_seeds=keys)
    assert together.tokens.shape[0] == (1 if seq_len == 600 else 2)
    with torch.no_grad():
        mixed = flow.document_losses(model, together, cfg.flow, seed=3)
        whole = flow.loss_parts(model, together, cfg.flow, seed=3)
        for d, (doc, key) in enumerate(zip(docs, keys)):
            alone = flow.document_losses(model, pack([doc], seq_len, SPECIALS, patch_size=2, image_seeds=[key]),
                                         cfg.flow, seed=3)
            for name in ("lm_sum", "lm_count", "flow_sum", "flow_count"):
                torch.testing.assert_close(mixed[name][d], alone[name][0], rtol=1e-5, atol=1e-5, msg=name)
    assert mixed["flow_count"].tolist() == [4 * 16 * 16, 4 * 8 * 16, 4 * 12 * 12]  # each image's own MSE weight
    assert float(mixed["flow_sum"][1]) > 0 and float(mixed["lm_sum"].min()) > 0
    # the batch loss is the exact element-weighted mean of the documents' (the normalisation of today)
    torch.testing.assert_close(whole.flow_sum, mixed["flow_sum"].sum(), rtol=1e-5, atol=1e-4)
    assert int(whole.flow_count) == int(mixed["flow_count"].sum())
    torch.testing.assert_close(whole.lm_sum, mixed["lm_sum"].sum(), rtol=1e-5, atol=1e-4)


def test_latents_must_split_into_whole_patches():
    with pytest.raises(ValueError, match="multiples of model.patch_size=2"):
        pack([[Text([1]), Image(torch.zeros(4, 8, 5))]], 100, SPECIALS, patch_size=2)


def test_non_square_generation_cached_equals_recomputed():
    model, _ = _live_model()
    noise = torch.randn(2, 4, 4, 12, generator=torch.Generator().manual_seed(0))  # a wide 16x48 px image
    a = sample.sample_latents(model, [[10, 20], [30]], SPECIALS, noise, steps=3, cfg_scale=2.0, use_cache=True)
    b = sample.sample_latents(model, [[10, 20], [30]], SPECIALS, noise, steps=3, cfg_scale=2.0, use_cache=False)
    assert a.shape == noise.shape
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
