"""The GPU path: flex attention agrees with SDPA, a MoT block compiles whole, bf16 training steps.

The CUDA tests skip with a reason on a CPU machine; the CPU test checks that ``attention="auto"``
falls back to SDPA there and the model still trains.
"""
from __future__ import annotations

import pytest
import torch

from helpers import SPECIALS, debug_model, mixed_batch, mixed_examples
from transfusion_mot import flow
from transfusion_mot.components.optim import build_optimizer
from transfusion_mot.data.packing import pack
from transfusion_mot.model import Routing
from transfusion_mot.model.masks import flex_block_mask, mask_from_batch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (flex attention, bf16, compile)")


def train_step(model, batch, cfg, autocast: bool = False) -> tuple[float, float]:
    """One optimizer step; returns the loss and how far the weights moved."""
    opt = build_optimizer(model, cfg.optim, fused=batch.tokens.is_cuda)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = flow.loss_parts(model, batch, cfg.flow, seed=0).total(cfg.flow.loss_weight)
    loss.backward()
    opt.step()
    moved = max(float((p.detach() - b).abs().max()) for p, b in zip(model.parameters(), before))
    return float(loss.detach()), moved


def test_auto_attention_trains_on_cpu():
    model, cfg = debug_model("model.attention=auto")
    batch = mixed_batch()
    assert isinstance(model.attention_mask(batch), torch.Tensor)  # SDPA's boolean mask, not a BlockMask
    loss, moved = train_step(model, batch, cfg)
    assert torch.isfinite(torch.tensor(loss)) and moved > 0


@cuda
@pytest.mark.parametrize("size", ["debug", "small"])
def test_flex_matches_sdpa(size):
    model, cfg = debug_model(f"model.size={size}", "model.arch=mot")
    model = model.cuda().eval()
    channels, latent = cfg.model.latent_channels, cfg.model.latent_size
    batch = pack(mixed_examples(0, 6, channels, latent), 256 if size == "debug" else 512, SPECIALS,
                 patch_size=cfg.model.patch_size)
    batch.t = torch.full((batch.n_images,), 0.5)
    batch = batch.to("cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        sdpa = model(batch, mask=mask_from_batch(batch.doc_id, batch.image_id))
        flex = model(batch, mask=flex_block_mask(batch.doc_id, batch.image_id))
    real = (batch.doc_id >= 0)[..., None]  # padding rows may differ (each sees only itself)
    torch.testing.assert_close((flex.hidden * real).float(), (sdpa.hidden * real).float(), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(flex.logits.float(), sdpa.logits.float(), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(flex.velocity.float(), sdpa.velocity.float(), atol=3e-2, rtol=3e-2)


@cuda
def test_compiled_mot_block_fullgraph_forward_backward():
    """Routing is computed outside the block, so a block has no data-dependent Python control flow."""
    model, cfg = debug_model("model.arch=mot")
    model = model.cuda()
    batch = mixed_batch(seq_len=128).to("cuda")
    mask = flex_block_mask(batch.doc_id, batch.image_id)
    routing = Routing.from_modality(batch.modality, cfg.model.n_modalities)
    rope = model.backbone.rotary(batch.position)
    block = model.backbone.blocks[0]
    x = torch.randn(batch.tokens.numel(), cfg.model.dim, device="cuda", requires_grad=True)  # (N, D)

    eager = routing.merge(block(routing.split(x), routing, rope, mask))
    (grad_eager,) = torch.autograd.grad(eager.pow(2).sum(), x)
    compiled = torch.compile(block, fullgraph=True)
    out = routing.merge(compiled(routing.split(x), routing, rope, mask))
    (grad,) = torch.autograd.grad(out.pow(2).sum(), x)
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad, grad_eager, atol=1e-3, rtol=1e-3)


@cuda
@pytest.mark.parametrize("arch", ["mot", "dense"])
def test_bf16_autocast_training_step(arch):
    model, cfg = debug_model(f"model.arch={arch}", "model.attention=auto")
    model = model.cuda()
    batch = mixed_batch().to("cuda")
    loss, moved = train_step(model, batch, cfg, autocast=True)
    assert torch.isfinite(torch.tensor(loss)) and moved > 0
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
