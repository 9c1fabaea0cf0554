"""The accelerated paths, tested on CPU wherever torch runs them, and on CUDA where a GPU is present
(``eval/benchmarks/gpu_check.sh`` runs this file there): flex attention against SDPA (forward; training through the
CPU fallback, sampling with the KV cache), a compiled MoT block (fullgraph, routing as an input, one graph
for every layer and batch), and bf16 autocast training steps. Each CUDA-only case says what needs CUDA.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch._dynamo.testing import CompileCounterWithBackend

from helpers import SPECIALS, debug_model, mixed_batch, mixed_examples
from transfusion_mot import flow
from transfusion_mot.components.optim import build_optimizer
from transfusion_mot.data.packing import pack
from transfusion_mot.model import Routing
from transfusion_mot.model.masks import additive_mask, flex_block_mask, mask_from_batch
from transfusion_mot.sample import caption_images, generate_images
from transfusion_mot.train import compile_blocks

cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                          reason="CUDA kernels (flex, inductor/triton, bf16 tensor cores): needs a CUDA GPU; the CPU case runs")
DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]


def train_step(model, batch, cfg, autocast: bool = False) -> tuple[float, float]:
    """One optimizer step; returns the loss and how far the weights moved."""
    device = batch.tokens.device.type
    opt = build_optimizer(model, cfg.optim, fused=device == "cuda")
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        loss = flow.loss_parts(model, batch, cfg.flow, seed=0).total(cfg.flow.loss_weight)
    loss.backward()
    opt.step()
    moved = max(float((p.detach() - b).abs().max()) for p, b in zip(model.parameters(), before))
    return float(loss.detach()), moved


def live_model(*overrides: str, device: str = "cpu"):
    """A debug model whose velocity head is not zero (it is zero-initialised for training)."""
    model, cfg = debug_model(*overrides)
    torch.manual_seed(1)
    nn.init.normal_(model.adapters[1].out.weight, std=0.05)
    return model.to(device), cfg


def test_auto_attention_trains_on_cpu():
    model, cfg = debug_model("model.attention=auto")
    batch = mixed_batch()
    assert isinstance(model.attention_mask(batch), torch.Tensor)  # SDPA's boolean mask, not a BlockMask
    loss, moved = train_step(model, batch, cfg)
    assert torch.isfinite(torch.tensor(loss)) and moved > 0


@pytest.mark.parametrize("device,size", [("cpu", "debug"), pytest.param("cuda", "debug", marks=cuda),
                                         pytest.param("cuda", "small", marks=cuda)])
def test_flex_matches_sdpa(device, size):
    model, cfg = live_model(f"model.size={size}", "model.arch=mot", device=device)
    model.eval()
    channels, latent = cfg.model.latent_channels, cfg.model.latent_size
    batch = pack(mixed_examples(0, 6, channels, latent), 256 if size == "debug" else 512, SPECIALS,
                 patch_size=cfg.model.patch_size)
    batch.t = torch.full((batch.n_images,), 0.5)
    batch = batch.to(device)
    tol = 3e-2 if device == "cuda" else 1e-4  # CUDA: bf16 autocast; CPU: float32
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        sdpa = model(batch, mask=mask_from_batch(batch.doc_id, batch.image_id))
        flex = model(batch, mask=flex_block_mask(batch.doc_id, batch.image_id))
    real = (batch.doc_id >= 0)[..., None]
    torch.testing.assert_close((flex.hidden * real).float(), (sdpa.hidden * real).float(), atol=tol, rtol=tol)
    torch.testing.assert_close(flex.logits.float(), sdpa.logits.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(flex.velocity.float(), sdpa.velocity.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_flex_attention_trains_and_samples_with_the_kv_cache(device):
    """``model.attention=flex`` end to end: a training step (on CPU through SDPA over the same rule, torch
    having no flex backward there) and sampling with the KV cache (flex with a mask of the new queries
    against the cached keys) agree with ``model.attention=sdpa``."""
    sdpa, cfg = live_model("model.attention=sdpa", device=device)
    flex, _ = live_model("model.attention=flex", device=device)
    batch = mixed_batch().to(device)
    losses = [flow.loss_parts(m, batch, cfg.flow, seed=0).total(cfg.flow.loss_weight) for m in (sdpa, flex)]
    for loss in losses:
        loss.backward()
    tol = 1e-5 if device == "cpu" else 1e-2  # CUDA: flex's own kernels (TF32-class float32 arithmetic)
    torch.testing.assert_close(losses[0], losses[1], atol=tol, rtol=tol)
    for a, b in zip(sdpa.parameters(), flex.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=tol, rtol=tol)
    prompts = [[10, 20, 30], [40, 50, 60, 70, 80, 90]]
    images = [generate_images(m, prompts, SPECIALS, steps=3, cfg_scale=2.0, seed=1) for m in (sdpa, flex)]
    torch.testing.assert_close(images[0], images[1], atol=tol, rtol=tol)
    captions = [caption_images(m, images[0], SPECIALS, max_new_tokens=5) for m in (sdpa, flex)]
    assert captions[0] == captions[1] if device == "cpu" else len(captions[0]) == len(captions[1])  # near-ties


@torch._dynamo.config.patch(error_on_recompile=True)  # a second graph for another layer or batch fails
def _compiled_vs_eager(device: str, arch: str, backend: str) -> None:
    """Eager blocks vs the same blocks compiled as train.py compiles them, over batches whose group
    sizes differ: equal outputs and gradients, one graph for every layer and every batch."""
    torch._dynamo.reset()  # graphs of other tests' models are not this one's
    model, cfg = debug_model(f"model.arch={arch}", "model.n_layers=2")
    model = model.to(device)
    eager = [block.forward for block in model.backbone.blocks]
    counter = CompileCounterWithBackend(backend)
    compile_blocks(model, backend=counter)
    n_groups = model.backbone.n_groups
    for seed in (0, 1):  # (3, 128) batches of different documents: new group sizes
        batch = pack(mixed_examples(seed, 6), 128, SPECIALS, patch_size=2, n_rows=3).to(device)
        routing = Routing.from_modality(batch.modality, n_groups)
        rope = model.backbone.rotary(batch.position)
        mask = additive_mask(mask_from_batch(batch.doc_id, batch.image_id), torch.float32)
        x = torch.randn(batch.tokens.numel(), cfg.model.dim, device=device, requires_grad=True)  # (N, D)
        results = []
        for blocks in (eager, model.backbone.blocks):
            xs = routing.split(x)
            for block in blocks:
                routing.mark_dynamic(xs)  # as Backbone.forward does before every block
                xs = block(xs, routing, rope, mask)
            out = routing.merge(xs)
            weights = [p for block in model.backbone.blocks for p in block.parameters()]
            results.append((out, *torch.autograd.grad(out.pow(2).sum(), [x, *weights])))
        tol = 1e-6 if backend == "aot_eager" else 1e-4  # inductor fuses ops: float32 rounds differently
        for a, b in zip(*results):  # relative error of each output / gradient tensor as a whole
            assert float((b - a).norm() / a.norm().clamp_min(1e-12)) < tol
    assert counter.frame_count >= 1  # compiled, with no recompile (error_on_recompile) and no break (fullgraph)


@pytest.mark.parametrize("arch", ["mot", "dense"])
def test_compiled_block_is_one_graph_with_equal_outputs_and_gradients(arch):
    """Dynamo + AOT autograd (the graph capture that inductor compiles), quick on CPU."""
    _compiled_vs_eager("cpu", arch, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mot", "dense"])
def test_inductor_compiled_block_on_cpu(arch):
    """Inductor's C++ kernels on CPU (a minute of compiling on a 2-core machine: marked slow)."""
    _compiled_vs_eager("cpu", arch, "inductor")


@cuda
@pytest.mark.parametrize("arch", ["mot", "dense"])
def test_inductor_compiled_block_on_cuda(arch):
    _compiled_vs_eager("cuda", arch, "inductor")


def test_compiled_block_takes_a_flex_mask():
    """Forward-only passes (evaluation, sampling) run flex inside the compiled block on CPU too."""
    model, cfg = live_model("model.arch=mot")
    batch = mixed_batch()
    routing = Routing.from_modality(batch.modality, 2)
    rope = model.backbone.rotary(batch.position)
    block = model.backbone.blocks[0]
    x = torch.randn(batch.tokens.numel(), cfg.model.dim)
    with torch.no_grad():
        ref = routing.merge(block(routing.split(x), routing, rope, mask_from_batch(batch.doc_id, batch.image_id)))
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        out = routing.merge(compiled(routing.split(x), routing, rope, flex_block_mask(batch.doc_id, batch.image_id)))
    real = (batch.doc_id >= 0).reshape(-1, 1)
    torch.testing.assert_close(out * real, ref * real, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["mot", "dense"])
def test_bf16_autocast_training_step(device, arch):
    model, cfg = debug_model(f"model.arch={arch}", "model.attention=auto")
    reference, _ = debug_model(f"model.arch={arch}", "model.attention=auto")
    batch = mixed_batch().to(device)
    loss, moved = train_step(model.to(device), batch, cfg, autocast=True)
    loss32, _ = train_step(reference.to(device), batch, cfg, autocast=False)
    assert torch.isfinite(torch.tensor(loss)) and moved > 0
    assert abs(loss - loss32) < 2e-2 * abs(loss32), (loss, loss32)  # bf16 matmuls, fp32 losses
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
