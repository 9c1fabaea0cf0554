"""A third, toy modality added from this file alone (issue 21, must show): continuous 1-D frames with a
segment type, an adapter and a codec stub defined here, registered by name, and the debug model trained
two steps with 3 MoT groups. No package file knows about "frames"."""
from dataclasses import dataclass

import torch
from helpers import SPECIALS, VOCAB, debug_config

from transfusion_mot import flow
from transfusion_mot.data.packing import TEXT, pack
from transfusion_mot.data.segments import Continuous, Image, Text
from transfusion_mot.model import build_model
from transfusion_mot.model.adapters import ContinuousAdapter, register_modality
from transfusion_mot.model.masks import mask_from_batch

FRAME = 6  # samples per frame


class FrameCodec:
    """Codec stub: a 1-D signal <-> frames (n, FRAME), scaled to unit variance like the image latents."""

    scale = 2.0

    def encode(self, signal: torch.Tensor) -> torch.Tensor:
        return (signal[: len(signal) // FRAME * FRAME] * self.scale).reshape(-1, FRAME)

    def decode(self, frames: torch.Tensor) -> torch.Tensor:
        return frames.reshape(-1) / self.scale


@dataclass
class Frames(Continuous):
    modality = "frames"


register_modality("frames", lambda dim: ContinuousAdapter(FRAME, dim))


def _examples():
    g = torch.Generator().manual_seed(0)
    codec = FrameCodec()
    wave = lambda n: torch.sin(torch.linspace(0, 6, n) + torch.rand(1, generator=g) * 3)  # noqa: E731
    return [[Text([5, 6, 7]), Frames(codec.encode(wave(60)))],  # "caption -> sound", 10 frames
            [Text([8, 9]), Image(torch.randn(4, 8, 8, generator=g)), Frames(codec.encode(wave(36)))],  # 3 kinds
            [Frames(codec.encode(wave(24))), Text([10, 11, 12])]]


def test_codec_stub_round_trips():
    signal = torch.randn(48)
    torch.testing.assert_close(FrameCodec().decode(FrameCodec().encode(signal)), signal)


def test_frames_pack_as_a_third_modality_in_a_bidirectional_span():
    batch = pack(_examples(), 128, SPECIALS, patch_size=2, extra_modalities=("frames",))
    assert sorted(batch.modality.unique().tolist()) == [TEXT, 1, 2]
    assert batch.values[2].shape == (10 + 6 + 4, FRAME) and batch.value_spans[2][:, 0].tolist() == [10, 6, 4]
    assert batch.flow_elements() == 16 * 16 + 20 * FRAME
    mask = mask_from_batch(batch.doc_id, batch.image_id)[0, 0]  # (T, T) of row 0
    pos = (batch.modality[0] == 2).nonzero().squeeze(1)[:10]  # the first document's frames
    assert bool(mask[pos[0], pos[-1]])  # the first frame sees the last one: bidirectional, like an image
    assert (batch.text_targets[batch.modality == 2] == -100).all()  # frames are never next-token targets


def test_debug_model_trains_two_steps_with_three_groups():
    cfg = debug_config("model.extra_modalities=[frames]")
    torch.manual_seed(0)
    model = build_model(cfg.model, VOCAB)
    groups = {name.split(".groups.")[1].split(".")[0] for name, _ in model.named_parameters() if ".groups." in name}
    assert groups == {"0", "1", "2"}  # the number of MoT groups followed from the config
    batch = pack(_examples(), 128, SPECIALS, patch_size=2, extra_modalities=cfg.model.extra_modalities)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(2):
        parts = flow.loss_parts(model, batch, cfg.flow, seed=step)
        loss = parts.total(cfg.flow.loss_weight)
        opt.zero_grad()
        loss.backward()
        if step == 1:  # (at step 0 the zero-initialised velocity head passes no gradient back, as for images)
            third = [p.grad for n, p in model.named_parameters() if ".groups.2." in n]
            assert third and all(g is not None and g.abs().sum() > 0 for g in third)  # frames reach their group
            assert model.adapters[2].out.weight.grad.abs().sum() > 0  # and their adapter's velocity head
        opt.step()
        losses.append(float(loss.detach()))
        assert int(parts.flow_count) == batch.flow_elements()
    assert all(torch.isfinite(torch.tensor(losses)))
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any(".groups.2." in n for n in moved) and any(n.startswith("adapters.2.") for n in moved)


def test_a_plug_in_span_gets_the_same_noise_in_any_batch():
    """Keyed by the example (its data position), not by where its span lands in a batch."""
    cfg = debug_config("model.extra_modalities=[frames]")
    ex = _examples()
    alone = pack([ex[0]], 128, SPECIALS, patch_size=2, extra_modalities=("frames",), example_keys=[17])
    behind = pack([ex[2], ex[1], ex[0]], 256, SPECIALS, patch_size=2, extra_modalities=("frames",),
                  example_keys=[3, 4, 17])
    _, t_a, noise_a = flow._noise_values(alone, cfg.flow, seed=0)
    _, t_b, noise_b = flow._noise_values(behind, cfg.flow, seed=0)
    n = alone.values[2].shape[0]  # example 17's frames come last in the second batch
    torch.testing.assert_close(noise_a[2], noise_b[2][-n:], rtol=0, atol=0)
    torch.testing.assert_close(t_a[2], t_b[2][-n:], rtol=0, atol=0)
    other = pack([ex[0]], 128, SPECIALS, patch_size=2, extra_modalities=("frames",), example_keys=[18])
    assert not torch.equal(flow._noise_values(other, cfg.flow, seed=0)[2][2], noise_a[2])  # another example: other noise
