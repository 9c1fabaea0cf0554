"""``model.image_pos=sincos2d``: each image patch gets its (row, column) in its own grid, so a patch's input
depends on where it is in the image (not only on its place in the sequence), for every image shape in a
batch, and the cached sampler sees the same positions as training."""
import pytest
import torch
import torch.nn as nn
from conftest import REPO
from helpers import SPECIALS, debug_model, mixed_examples

from transfusion_mot import flow, sample
from transfusion_mot.config import ConfigError, load_config
from transfusion_mot.data.packing import IMAGE, pack
from transfusion_mot.data.segments import Image, Text
from transfusion_mot.model.layers import grid_sincos


def test_grid_sincos_encodes_row_and_column_of_each_span():
    counts, widths = torch.tensor([4, 6]), torch.tensor([2, 3])  # a 2x2 grid, then a 2x3 grid
    e = grid_sincos(counts, widths, dim=16)
    assert e.shape == (10, 16)
    rows = [0, 0, 1, 1, 0, 0, 0, 1, 1, 1]
    cols = [0, 1, 0, 1, 0, 1, 2, 0, 1, 2]
    freqs = 10000.0 ** (-torch.arange(4) / 4)
    for i, (r, c) in enumerate(zip(rows, cols)):
        torch.testing.assert_close(e[i, :4], torch.sin(r * freqs))
        torch.testing.assert_close(e[i, 4:8], torch.cos(r * freqs))
        torch.testing.assert_close(e[i, 8:12], torch.sin(c * freqs))
        torch.testing.assert_close(e[i, 12:], torch.cos(c * freqs))


def _embedded_patches(model, latents: list[torch.Tensor]) -> list[torch.Tensor]:
    """The backbone inputs at each image's patch positions, one (n_patches, D) tensor per image."""
    batch = pack([[Text([5, 6]), Image(lat)] for lat in latents], 96, SPECIALS, patch_size=2)
    batch = batch.replace(t=torch.full((len(latents),), 0.5))
    x = model.embed(batch)
    out = []
    for i in range(len(latents)):
        out.append(x[(batch.image_id == i) & (batch.modality == IMAGE)])
    return out


def test_patch_input_depends_on_its_grid_position_only_with_sincos2d():
    # the same value in every patch: the inputs differ only through position
    flat = torch.ones(4, 8, 8)
    plain, _ = debug_model()
    grid, _ = debug_model("model.image_pos=sincos2d")
    (p,) = _embedded_patches(plain, [flat])
    (g,) = _embedded_patches(grid, [flat])
    assert torch.allclose(p, p[:1].expand_as(p))  # 1-D RoPE only: every patch enters the same
    assert torch.unique(g.round(decimals=5), dim=0).shape[0] == g.shape[0]  # each of the 16 is its own
    # same init draws (the embedding has no parameters), so the difference is exactly the sin-cos table
    torch.testing.assert_close(g - p, grid_sincos(torch.tensor([16]), torch.tensor([4]), g.shape[-1]))


def test_each_image_shape_in_a_batch_gets_its_own_grid():
    # a 4x2-patch image and a 2x4-patch image (latents 8x4 and 4x8): patch 2 is (row 1, col 0) in the
    # first and (row 0, col 2) in the second
    model, _ = debug_model("model.image_pos=sincos2d")
    plain, _ = debug_model()
    tall, wide = torch.ones(4, 8, 4), torch.ones(4, 4, 8)
    gt, gw = _embedded_patches(model, [tall, wide])
    pt, pw = _embedded_patches(plain, [tall, wide])
    d = gt.shape[-1]
    torch.testing.assert_close(gt - pt, grid_sincos(torch.tensor([8]), torch.tensor([2]), d))
    torch.testing.assert_close(gw - pw, grid_sincos(torch.tensor([8]), torch.tensor([4]), d))
    assert not torch.allclose(gt[2], gw[2])


def test_cached_sampling_equals_uncached_with_sincos2d():
    model, _ = debug_model("model.image_pos=sincos2d")
    torch.manual_seed(1)
    nn.init.normal_(model.adapters[IMAGE].out.weight, std=0.05)
    model.eval()
    prompts = [[10, 20, 30], [40, 50, 60, 70, 80, 90], [7]]
    a = sample.generate_images(model, prompts, SPECIALS, steps=5, cfg_scale=3.0, seed=1, use_cache=True)
    b = sample.generate_images(model, prompts, SPECIALS, steps=5, cfg_scale=3.0, seed=1, use_cache=False)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    plain, _ = debug_model()
    torch.manual_seed(1)
    nn.init.normal_(plain.adapters[IMAGE].out.weight, std=0.05)
    c = sample.generate_images(plain.eval(), prompts, SPECIALS, steps=5, cfg_scale=3.0, seed=1)
    assert (a - c).abs().max() > 1e-3  # the position reaches the samples


def test_training_loss_runs_and_differs_with_sincos2d():
    batch = pack(mixed_examples(seed=0, n=4), 96, SPECIALS, patch_size=2)
    losses = {}
    for pos in ("rope1d", "sincos2d"):
        model, cfg = debug_model(f"model.image_pos={pos}")
        nn.init.normal_(model.adapters[IMAGE].out.weight, std=0.05)
        parts = flow.loss_parts(model, batch, cfg.flow, seed=0)
        parts.flow_sum.backward()
        assert model.adapters[IMAGE].inp.weight.grad.abs().sum() > 0
        losses[pos] = float(parts.flow_sum.detach())
    assert losses["rope1d"] != losses["sincos2d"]


def test_unknown_image_pos_is_a_config_error():
    with pytest.raises(ConfigError, match="model.image_pos='sincos'"):
        debug_model("model.image_pos=sincos")
    with pytest.raises(ConfigError, match="model.dim=66 into row and column"):
        debug_model("model.image_pos=sincos2d", "model.dim=66", "model.n_heads=1")


def test_sincos2d_in_the_chameleon_setting_is_a_config_error():
    with pytest.raises(ConfigError, match="model.image_pos=sincos2d: model.setting=chameleon"):
        load_config(str(REPO / "configs" / "chameleon_debug.yaml"), ["model.image_pos=sincos2d"])
    load_config(str(REPO / "configs" / "chameleon_debug.yaml"))  # the default passes
