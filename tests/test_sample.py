"""Sampling: the cached prompt equals recomputing it, the Euler/CFG arithmetic is exact on a model with a
closed-form velocity, seeds reproduce, and text / caption / interleaved generation are well formed."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from helpers import SPECIALS, debug_model

from transfusion_mot import sample
from transfusion_mot.data.packing import TEXT, pack
from transfusion_mot.data.segments import Text
from transfusion_mot.model.transfusion import Outputs


def _live_debug_model(seed: int = 0):
    """A debug model whose velocity head is not zero (it is zero-initialised for training)."""
    model, cfg = debug_model(seed=seed)
    torch.manual_seed(seed + 1)
    nn.init.normal_(model.adapters[1].out.weight, std=0.05)
    return model.eval(), cfg


PROMPTS = [[10, 20, 30], [40, 50, 60, 70, 80, 90], [7]]


def test_cached_prompt_equals_recomputing_it():
    model, _ = _live_debug_model()
    for scale in (1.0, 3.0):
        a = sample.generate_images(model, PROMPTS, SPECIALS, steps=6, cfg_scale=scale, seed=1, use_cache=True)
        b = sample.generate_images(model, PROMPTS, SPECIALS, steps=6, cfg_scale=scale, seed=1, use_cache=False)
        assert a.shape == (3, 4, 8, 8)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_seeds_reproduce_and_batch_size_does_not_matter():
    model, _ = _live_debug_model()
    kw = dict(steps=4, cfg_scale=2.0)
    a = sample.generate_images(model, PROMPTS, SPECIALS, seed=5, batch_size=3, **kw)
    b = sample.generate_images(model, PROMPTS, SPECIALS, seed=5, batch_size=1, **kw)
    c = sample.generate_images(model, PROMPTS, SPECIALS, seed=6, batch_size=3, **kw)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # left padding isolates rows
    assert (a - c).abs().mean() > 0.1
    several = sample.generate_images(model, PROMPTS[:1], SPECIALS, seed=5, n_per_prompt=2, **kw)
    assert several.shape[0] == 2 and not torch.allclose(several[0], several[1])


class ClosedForm(nn.Module):
    """Velocity (x - a) / t for rows with a prompt, (x - b) / t for the unconditional ``BOS, BOI`` rows:
    the exact velocity of straight paths ending at a or b, so Euler lands on them exactly and CFG with
    scale s lands on b + s (a - b). It reads "has a prompt" from its KV cache like attention would."""

    def __init__(self, a: float, b: float):
        super().__init__()
        self.cfg = SimpleNamespace(n_layers=1, patch_size=1, latent_channels=2, latent_size=3)
        self.a, self.b = a, b
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, batch, mask=None, cache=None):
        real = ((batch.doc_id >= 0) & (batch.modality == TEXT)).float()[:, None, :, None]
        if cache is not None:
            real, _ = cache.extend(0, real, real)
        cond = real[:, 0, :, 0].sum(1) > 2
        if batch.n_images == 0:  # the prompt pass: nothing to predict
            cond = cond[:0]
        counts = batch.patch_counts()  # velocities are per patch (P, C*p*p), image after image
        target = torch.where(cond, self.a, self.b).repeat_interleave(counts).view(-1, 1)
        t = batch.t.repeat_interleave(counts).view(-1, 1).clamp(min=1e-6)
        text_index = ((batch.modality == TEXT) & (batch.doc_id >= 0)).reshape(-1).nonzero().squeeze(1)
        return Outputs(torch.zeros(len(text_index), 300), text_index, (batch.patches - target) / t,
                       None, torch.zeros(()))


@pytest.mark.parametrize("use_cache", [True, False])
def test_exact_endpoint_and_cfg_arithmetic(use_cache):
    model = ClosedForm(a=2.0, b=-1.0)
    for steps in (1, 5, 250):
        for scale, end in ((1.0, 2.0), (0.0, -1.0), (3.0, -1.0 + 3 * 3.0)):
            x = sample.generate_images(model, [[5, 6, 7], [9]], SPECIALS, steps=steps, cfg_scale=scale,
                                       seed=0, use_cache=use_cache)
            torch.testing.assert_close(x, torch.full_like(x, end), atol=1e-4, rtol=1e-5)


def test_cfg_scale_zero_is_the_unconditional_sample():
    model, _ = _live_debug_model()
    guided = sample.generate_images(model, PROMPTS[:2], SPECIALS, steps=4, cfg_scale=0.0, seed=3)
    uncond = sample.generate_images(model, [[], []], SPECIALS, steps=4, cfg_scale=1.0, seed=3)
    torch.testing.assert_close(guided, uncond, atol=1e-5, rtol=1e-5)
    cond = sample.generate_images(model, PROMPTS[:2], SPECIALS, steps=4, cfg_scale=1.0, seed=3)
    assert (cond - uncond).abs().mean() > 1e-3  # the prompt matters


def test_diffusers_scheduler_grid():
    grid = sample.time_steps(10, "FlowMatchEulerDiscreteScheduler")
    assert grid[0] == pytest.approx(1.0) and grid[-1] == 0.0 and len(grid) == 11
    assert grid == sorted(grid, reverse=True)
    model = ClosedForm(a=2.0, b=-1.0)  # any grid from 1 to 0 integrates the straight path exactly
    x = sample.generate_images(model, [[5, 6, 7]], SPECIALS, steps=10, cfg_scale=1.0,
                               scheduler="FlowMatchEulerDiscreteScheduler")
    torch.testing.assert_close(x, torch.full_like(x, 2.0), atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="sample.scheduler"):
        sample.time_steps(10, "DDPMScheduler")


def test_bad_arguments():
    model, _ = _live_debug_model()
    with pytest.raises(ValueError, match="steps=0"):
        sample.generate_images(model, PROMPTS, SPECIALS, steps=0)
    with pytest.raises(ValueError, match="cfg_scale=-1"):
        sample.generate_images(model, PROMPTS, SPECIALS, steps=2, cfg_scale=-1)
    with pytest.raises(ValueError, match="no prompts"):
        sample.generate_images(model, [], SPECIALS, steps=2)
    with pytest.warns(UserWarning, match="truncated"):
        assert sample.truncate_prompt(list(range(10)), 4) == [0, 1, 2, 3]


def _greedy_uncached(model, prompt: list[int], n: int, banned) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        batch = pack([[Text(ids)]], len(ids) + 2, SPECIALS, 2)
        out = model(batch)
        logits = out.logits[len(ids)].clone()  # the last prompt token (after BOS) predicts the next
        logits[list(banned)] = float("-inf")
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def test_text_kv_cache_matches_recomputing():
    model, _ = _live_debug_model()
    nn.init.normal_(model.adapters[0].head.weight, std=0.5)
    prompts = [[72, 105, 33], [1, 2, 3, 4, 5, 6, 7]]
    banned = (SPECIALS.boi, SPECIALS.eoi, SPECIALS.pad, SPECIALS.bos, SPECIALS.eos)
    cached = sample.generate_text(model, prompts, SPECIALS, max_new_tokens=6, min_new_tokens=6)
    for p, got in zip(prompts, cached):
        assert got == _greedy_uncached(model, p, 6, banned)


def test_sampling_text_is_seeded_and_filtered():
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample.pick_token(logits, temperature=1.0, top_k=2, generator=g).tolist()) <= {2, 3}
    assert set(sample.pick_token(logits, temperature=1.0, top_p=0.5, generator=g).tolist()) == {2}
    assert sample.pick_token(logits[:1]).item() == 2  # greedy
    a = sample.pick_token(logits, 1.0, generator=torch.Generator().manual_seed(1))
    b = sample.pick_token(logits, 1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_captioning_and_interleaved_are_well_formed():
    model, cfg = _live_debug_model()
    latents = torch.randn(2, 4, 8, 8)
    caps = sample.caption_images(model, latents, SPECIALS, max_new_tokens=5, temperature=1.0, seed=0)
    assert len(caps) == 2 and all(len(c) <= 5 for c in caps)
    assert all(SPECIALS.boi not in c and SPECIALS.eos not in c for c in caps)

    prompt = [104, 105, SPECIALS.boi]  # a prompt ending in BOI starts with an image
    segs = sample.generate_interleaved(model, prompt, SPECIALS, max_new_tokens=6, min_new_tokens=3, max_images=1,
                                       steps=3, cfg_scale=2.0, temperature=1.0, seed=0)
    kinds = [type(s).__name__ for s in segs]
    assert kinds == ["Text", "Image", "Text"], kinds
    assert segs[0].ids == [104, 105]
    assert segs[1].latent.shape == (4, 8, 8)
    assert 3 <= len(segs[2].ids) <= 6 and SPECIALS.boi not in segs[2].ids
