"""Model-level behaviour: overfitting a fixed batch, document permutation equivariance."""
import pytest
import torch
from torch import nn

from transfusion_mot import flow
from transfusion_mot.data.packing import pack
from transfusion_mot.model.adapters import MODALITIES, ContinuousAdapter, register_modality
from transfusion_mot.model.transfusion import LEGACY_NAMES

from helpers import SPECIALS, debug_model, mixed_batch, mixed_examples


def test_debug_model_overfits_one_fixed_batch():
    model, cfg = debug_model("model.arch=mot")
    batch = mixed_batch(seed=0, n=4, seq_len=128, t=None)
    g = torch.Generator().manual_seed(0)
    t = torch.rand(batch.n_images, generator=g) * 0.8 + 0.1
    noise = torch.randn(batch.patches.shape, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for step in range(300):
        parts = flow.loss_parts(model, batch, cfg.flow, seed=0, t=t, noise=noise)
        loss = parts.total(cfg.flow.loss_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or (parts.lm, parts.flow)
    assert parts.lm < first[0] / 10, (first, parts.lm)
    assert parts.flow < first[1] / 10, (first, parts.flow)


def test_permuting_documents_permutes_outputs():
    model, _ = debug_model()
    examples = mixed_examples(seed=3, n=5)
    order = [3, 0, 4, 2, 1]
    a = pack(examples, 200, SPECIALS, 2)
    b = pack([examples[i] for i in order], 200, SPECIALS, 2)
    for x in (a, b):
        x.t = torch.linspace(0.2, 0.8, x.n_images)
    # same t per image regardless of order: image k of `a` is at rank of its example in `b`
    img_examples = [i for i, e in enumerate(examples) for s in e if hasattr(s, "latent")]
    img_b = [i for i in order for s in examples[i] if hasattr(s, "latent")]
    b.t = torch.stack([a.t[img_examples.index(i)] for i in img_b])
    out_a, out_b = model(a), model(b)
    va, vb = out_a.velocity.split(a.patch_counts().tolist()), out_b.velocity.split(b.patch_counts().tolist())
    for k, i in enumerate(img_b):
        torch.testing.assert_close(vb[k], va[img_examples.index(i)], atol=1e-5, rtol=1e-5)
    # logits per document
    def per_doc(batch, out):
        docs = batch.doc_id.reshape(-1)[out.text_index]
        return [out.logits[docs == d] for d in range(len(examples))]
    la, lb = per_doc(a, out_a), per_doc(b, out_b)
    for k, i in enumerate(order):
        torch.testing.assert_close(lb[k], la[i], atol=1e-5, rtol=1e-5)
    # and the permuted batch's loss is the same
    sa = flow.loss_parts(model, a, debug_model()[1].flow, seed=0, t=a.t, noise=torch.zeros_like(a.patches))
    sb = flow.loss_parts(model, b, debug_model()[1].flow, seed=0, t=b.t, noise=torch.zeros_like(b.patches))
    torch.testing.assert_close(sa.lm_sum, sb.lm_sum, rtol=1e-5, atol=1e-4)


def test_text_image_and_plug_ins_are_one_adapter_list():
    """Text (0) and image (1) go through adapters like the plug-ins (2, ...): no parameter outside the list
    but the backbone's, and num_params(embeddings=False) leaves out the text embedding and LM head only."""
    register_modality("frames_m", lambda dim: ContinuousAdapter(6, dim))
    try:
        model, cfg = debug_model("model.extra_modalities=[frames_m]")
    finally:
        MODALITIES.pop("frames_m")
    assert [a.kind for a in model.adapters] == ["discrete", "continuous", "continuous"]
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == {"adapters", "backbone"}
    assert model.adapters[0].emb.weight.shape == (VOCAB_ROWS, cfg.model.backbone.dim)
    assert (model.adapters[1].out.weight == 0).all() and (model.adapters[2].out.weight == 0).all()  # zero velocity
    text = sum(p.numel() for p in model.adapters[0].parameters())
    assert model.num_params(embeddings=False) == model.num_params() - text
    assert isinstance(model.adapters[1].t_emb.mlp, nn.Sequential)


VOCAB_ROWS = 320  # helpers.VOCAB (261) rounded up to 64


def test_a_seed_gives_the_weights_and_losses_it_gave_before_the_adapter_list():
    """Golden numbers of the debug model at seed 0, measured at 3cf91e6 (before text and image became
    adapters, under the old parameter names): initialisation draws in the old order."""
    model, cfg = debug_model()
    golden = {"adapters.0.emb.weight": [-0.0017970915650948882, -0.008659057319164276],  # tok_emb
              "adapters.1.inp.weight": [0.04776178300380707, 0.00111485889647156],  # patch_in
              "adapters.1.t_emb.mlp.0.weight": [0.008439875207841396, 0.020212432369589806],  # t_emb
              "backbone.blocks.1.ffn.groups.1.f.w2.weight": [-0.003540748031809926, 0.014045732095837593],
              "adapters.0.head.weight": [-0.012234711088240147, 0.014716199599206448]}  # lm_head
    state = model.state_dict()
    for name, values in golden.items():
        assert state[name].flatten()[:2].tolist() == values, name
    parts = flow.loss_parts(model, mixed_batch(seed=0, n=4, seq_len=96, t=0.5), cfg.flow, seed=0)
    assert (float(parts.lm), float(parts.flow)) == pytest.approx((5.738164901733398, 1.9230341911315918), rel=1e-6)


def test_old_parameter_names_load_into_the_adapters():
    """A state dict of an older version (tok_emb, lm_head, patch_in, patch_out, t_emb, extra.k) loads with
    load_state_dict (the pre-hook maps the names: model/transfusion.py current_name)."""
    register_modality("frames_m", lambda dim: ContinuousAdapter(6, dim))
    try:
        model, _ = debug_model("model.extra_modalities=[frames_m]", seed=0)
        fresh, _ = debug_model("model.extra_modalities=[frames_m]", seed=1)
    finally:
        MODALITIES.pop("frames_m")

    def old_name(name: str) -> str:
        for old, new in LEGACY_NAMES:
            if name.startswith(new):
                return old + name[len(new):]
        return name.replace("adapters.2.", "extra.0.")

    old = {old_name(k): v for k, v in model.state_dict().items()}
    assert {"tok_emb.weight", "lm_head.weight", "patch_out.bias", "t_emb.mlp.2.weight", "extra.0.inp.weight"} <= set(old)
    fresh.load_state_dict(old)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    assert list(fresh.state_dict()) == list(model.state_dict())
