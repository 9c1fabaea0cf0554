"""Model-level behaviour: overfitting a fixed batch, document permutation equivariance."""
import torch

from transfusion_mot import flow
from transfusion_mot.data.packing import pack

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
