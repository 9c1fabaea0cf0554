"""MoT invariants: tied == dense, upcycling, routing (each group's weights see only its own tokens), where
the image loss's gradient reaches the text weights under global attention, equal FLOPs per token."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from transfusion_mot.model import Backbone, BackboneConfig, Routing, untie_from_dense
from transfusion_mot.model.modality import PerModality

from helpers import debug_model, mixed_batch


def _tie(mot: Backbone, dense: Backbone) -> None:
    untie_from_dense(mot, dense)


@pytest.mark.parametrize("placement", ["post", "pre"])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_tied_mot_equals_dense(placement, qk_norm):
    torch.manual_seed(0)
    cfg = BackboneConfig(dim=32, n_layers=2, n_heads=4, norm_placement=placement, qk_norm=qk_norm)
    dense = Backbone(cfg, n_groups=1)
    for p in dense.parameters():  # non-trivial norm weights too
        p.data.normal_(0, 0.3)
    mot = Backbone(cfg, n_groups=2)
    _tie(mot, dense)
    x = torch.randn(2, 10, 32)
    modality = torch.randint(0, 2, (2, 10))
    pos = torch.arange(10).expand(2, 10)
    mask = torch.tril(torch.ones(10, 10, dtype=torch.bool))[None, None].expand(2, 1, 10, 10)
    torch.testing.assert_close(mot(x, modality, pos, mask), dense(x, modality, pos, mask), atol=1e-6, rtol=1e-6)  # fp32: group-split matmuls round differently


def test_upcycled_mot_equals_dense_model():
    dense, _ = debug_model("model.arch=dense")
    mot, _ = debug_model("model.arch=mot", seed=1)
    batch = mixed_batch()
    a, b = dense(batch), mot(batch)
    assert not torch.allclose(a.logits, b.logits)  # different init before upcycling
    untie_from_dense(mot, dense)
    b = mot(batch)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-6, rtol=1e-6)  # fp32: group-split matmuls round differently
    torch.testing.assert_close(b.velocity, a.velocity, atol=1e-6, rtol=1e-6)  # fp32: group-split matmuls round differently


def _group_grads(model, group: int) -> list[torch.Tensor]:
    return [p.grad for n, p in model.named_parameters() if f".groups.{group}." in n]


@pytest.mark.parametrize("only", [0, 1])
def test_routing_single_modality_batch_reaches_only_its_group(only):
    """Routing: with one modality in the batch, the other group's weights take part in nothing. (This says
    nothing about gradient isolation in a mixed batch: see the test below.)"""
    torch.manual_seed(0)
    bb = Backbone(BackboneConfig(dim=32, n_layers=2, n_heads=4), n_groups=2)
    x = torch.randn(2, 8, 32)
    modality = torch.full((2, 8), only)
    out = bb(x, modality, torch.arange(8).expand(2, 8), None)
    out.square().mean().backward()
    other = _group_grads(bb, 1 - only)
    mine = _group_grads(bb, only)
    assert other and all(g is None or g.abs().max() == 0 for g in other)
    assert any(g is not None and g.abs().max() > 0 for g in mine)


def test_routing_text_only_batch_reaches_no_image_weights():
    model, _ = debug_model()
    from transfusion_mot.data.packing import pack
    from transfusion_mot.data.segments import Text
    from helpers import SPECIALS
    batch = pack([[Text([1, 2, 3, 4])], [Text([5, 6])]], 16, SPECIALS, patch_size=2)
    out = model(batch)
    out.logits.square().mean().backward()
    assert all(g is None or g.abs().max() == 0 for g in _group_grads(model, 1))


def _image_loss_grads(placement: str) -> dict[str, torch.Tensor]:
    """Gradients of the flow (image) loss alone on a mixed caption->image / image->caption batch."""
    model, cfg = debug_model("model.arch=mot", f"model.norm_placement={placement}")
    for p in model.parameters():  # non-trivial weights everywhere (norms start at 1, the velocity head at 0)
        p.data.normal_(0, 0.2)
    batch = mixed_batch()
    assert batch.n_images and (batch.text_targets != -100).any()
    model(batch).velocity.square().mean().backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("placement", ["post", "pre"])
def test_image_loss_reaches_text_weights_only_through_attention(placement):
    """In a mixed batch the image loss is exactly zero on the text weights after the last attention (the
    last block's text output projection, FFN and their norms, the text final norm) and non-zero on the
    earlier text weights: image queries attend to text keys/values, so the image loss trains the text
    group through every earlier layer. MoT unties weights, not gradients."""
    grads = _image_loss_grads(placement)
    last = "backbone.blocks.1"
    after_attention = [n for n in grads if n.startswith((f"{last}.out.groups.0.", f"{last}.ffn.groups.0.",
                                                         "backbone.norm.groups.0."))]
    assert any("norm" in n for n in after_attention) and any(".out." in n for n in after_attention)
    for name in after_attention + ["adapters.0.head.weight"]:
        assert grads[name] is None or (grads[name] == 0).all(), name
    before = [n for n in grads if ".groups.0." in n and n not in after_attention]
    assert any(n.startswith("backbone.blocks.0.ffn.groups.0.") for n in before)
    for name in before:
        if name.startswith(f"{last}.qkv.groups.0.proj"):  # text Q is read by text queries only: K, V rows
            assert (grads[name][:64] == 0).all() and (grads[name][64:] != 0).any(), name
        else:
            assert grads[name] is not None and grads[name].abs().max() > 0, name


def test_three_modalities_route_each_token_to_its_group():
    torch.manual_seed(0)
    bb = Backbone(BackboneConfig(dim=32, n_layers=3, n_heads=4), n_groups=3)
    x = torch.randn(2, 12, 32)
    modality = torch.randint(0, 3, (2, 12))
    seen: dict[tuple, torch.Tensor] = {}

    def hook(key):
        return lambda mod, inp, out: seen.__setitem__(key, inp[0].detach())

    for li, block in enumerate(bb.blocks):
        for m, g in enumerate(block.qkv.groups):
            g.register_forward_hook(hook((li, m)))
    bb(x, modality, torch.arange(12).expand(2, 12), None)
    flat_x, flat_m = x.reshape(-1, 32), modality.reshape(-1)
    for m in range(3):
        # layer 0 sees the raw inputs: exactly the tokens of modality m, in order
        torch.testing.assert_close(seen[(0, m)], flat_x[flat_m == m])
        for li in range(3):
            assert seen[(li, m)].shape[0] == int((flat_m == m).sum())


def test_routing_rejects_unknown_modality():
    with pytest.raises(ValueError, match="modality ids"):
        Routing.from_modality(torch.tensor([[0, 1, 2]]), 2)


def test_per_modality_routes_each_token_and_split_round_trips():
    pm = PerModality(lambda: torch.nn.Linear(4, 4), 2)
    x = torch.randn(6, 4)  # (N, D) in sequence order
    modality = torch.tensor([[1, 0, 1, 1, 0, 0]])
    routing = Routing.from_modality(modality, 2)
    parts = routing.split(x)
    assert [p.shape[0] for p in parts] == [3, 3]
    assert torch.equal(routing.merge(parts), x)
    y = routing.merge(pm(parts))
    for i, m in enumerate(modality[0].tolist()):
        torch.testing.assert_close(y[i], pm.groups[m](x[i]))


def test_single_modality_batch_routes_without_copies():
    """An image-only sampling step (or a text-only one) splits into views and merges back to the same tensor."""
    routing = Routing.from_modality(torch.ones(2, 5, dtype=torch.long), 2)
    assert routing.index is None and routing.whole == 1 and routing.counts == [0, 10]
    x = torch.randn(10, 3)
    parts = routing.split(x)
    assert parts[0].shape == (0, 3) and parts[1].data_ptr() == x.data_ptr()
    assert routing.merge(parts) is parts[1]
    bb = Backbone(BackboneConfig(dim=32, n_layers=1, n_heads=4), n_groups=2)
    xs = torch.randn(2, 5, 32)
    mixed = torch.tensor([[0, 1, 1, 1, 1], [0, 1, 1, 1, 1]])  # same tokens' outputs, via the gather path
    pos = torch.arange(5).expand(2, 5)
    mask = torch.eye(5, dtype=torch.bool)[None, None].expand(2, 1, 5, 5)  # each token sees itself only
    torch.testing.assert_close(bb(xs, torch.ones(2, 5, dtype=torch.long), pos, mask)[:, 1:],
                               bb(xs, mixed, pos, mask)[:, 1:], atol=1e-6, rtol=1e-6)


def test_split_and_merge_gradients_equal_plain_indexing():
    """The hand-written backwards (merge <-> split) == autograd's of boolean-mask indexing."""
    modality = torch.tensor([[1, 0, 1, 1, 0, 0], [0, 1, 1, 0, 1, 2]])
    routing = Routing.from_modality(modality, 3)
    flat = modality.reshape(-1)
    x = torch.randn(12, 5, requires_grad=True)
    w = torch.randn(12, 5)
    scale = [torch.randn(c, 1) for c in routing.counts]
    (routing.merge([p * s for p, s in zip(routing.split(x), scale)]) * w).sum().backward()
    ours = x.grad.clone()
    x.grad = None
    ref = torch.zeros(12, 5)
    for g in range(3):
        ref = ref.index_put(((flat == g).nonzero().squeeze(1),), x[flat == g] * scale[g])
    (ref * w).sum().backward()
    assert torch.equal(ours, x.grad)
    x64 = torch.randn(12, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: routing.merge([p.sin() for p in routing.split(t)]), x64)
    assert torch.autograd.gradcheck(lambda t: routing.split(t)[1], x64)  # an unused group's gradient is zero


def _flops(model, batch) -> int:
    with FlopCounterMode(display=False) as counter:
        model(batch)
    return counter.get_total_flops()


def test_mot_flops_per_token_equal_dense():
    batch = mixed_batch()
    dense, _ = debug_model("model.arch=dense")
    mot, _ = debug_model("model.arch=mot")
    assert mot.num_params() > dense.num_params()
    assert mot.num_params(active=True) == dense.num_params()
    assert _flops(mot, batch) == _flops(dense, batch)


def test_moe_aux_losses():
    """Token choice carries its load-balancing loss; expert choice's (its causal router's predictor) is
    there in training only. FLOPs per real token: tests/test_moe.py and tests/test_flops.py."""
    batch = mixed_batch()
    tc, _ = debug_model("model.arch=moe", "model.moe_routing=token_choice")
    assert tc(batch).aux_loss > 0
    moe, _ = debug_model("model.arch=moe")
    assert moe.train()(batch).aux_loss > 0
    assert moe.eval()(batch).aux_loss == 0


def test_activation_checkpointing_gives_the_same_gradients():
    """Blocks recomputed in the backward (train.activation_checkpointing) change memory, not numbers."""
    torch.manual_seed(0)
    bb = Backbone(BackboneConfig(dim=32, n_layers=2, n_heads=4, norm_placement="pre"), n_groups=2).train()
    x = torch.randn(2, 10, 32)
    modality = torch.randint(0, 2, (2, 10))
    pos = torch.arange(10).expand(2, 10)
    grads = []
    for flag in (False, True):
        bb.checkpointing = flag
        bb.zero_grad(set_to_none=True)
        bb(x, modality, pos, None).square().mean().backward()
        grads.append([p.grad.clone() for p in bb.parameters()])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, atol=0, rtol=0)
