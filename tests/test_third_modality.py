"""A third, toy modality added from this file alone (issue 21, must show): continuous 1-D frames with a
segment type, an adapter and a codec stub defined here, registered by name, and the debug model trained
two steps with 3 MoT groups; then a data source registered here feeds frames to ``train()``, which trains,
evaluates, checkpoints and resumes exactly. No package file knows about "frames"."""
import json
from dataclasses import dataclass, replace

import pytest
import torch
from accelerate.utils import set_seed
from conftest import REPO, debug_overrides
from helpers import SPECIALS, VOCAB, debug_config
from safetensors.torch import load_file

from transfusion_mot import flow
from transfusion_mot.config import ConfigError, load_config
from transfusion_mot.data.packing import TEXT, Specials, pack
from transfusion_mot.data.pipeline import (
    build_records,
    build_stream,
    examples_per_batch,
    prepare_tokenizer,
)
from transfusion_mot.data.segments import Continuous, Image, Text
from transfusion_mot.data.sources import SourceSpec, register_source
from transfusion_mot.model import build_model
from transfusion_mot.model.adapters import ContinuousAdapter, register_modality
from transfusion_mot.model.masks import mask_from_batch
from transfusion_mot.train import train

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


# --- the same modality through train(): a data source registered by name yields records carrying frames ---
N_FRAMES = 4  # frames per record: 4 vectors + BOI / EOI in every document


class FramesShapes(torch.utils.data.Dataset):
    """A user's source: the shapes scenes, each with a short "sound" (frames of a sine wave whose pitch
    follows the record index) attached as a plug-in segment (``Record.extras``); every third record is
    sound and caption only (no image), as a speech record would be."""

    def __init__(self, data, split: str):
        from transfusion_mot.data.shapes import ShapesDataset

        size = data.shapes_train_size if split == "train" else data.shapes_val_size
        self.scenes = ShapesDataset(split=split, size=size, resolution=data.resolution)
        self.name = f"frames-{self.scenes.name}"

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int):
        rec = self.scenes[i]
        wave = torch.sin(torch.arange(N_FRAMES * FRAME) * (0.1 + 0.05 * (i % 7)))
        return replace(rec, image=None if i % 3 == 2 else rec.image, extras=[Frames(FrameCodec().encode(wave))])


register_source("frames_shapes", SourceSpec(lambda data, split: FramesShapes(data, split),
                                            extra_positions=N_FRAMES + 2))


def _run(out, *extra, evaluate=False):
    cfg = load_config(str(REPO / "configs" / "debug.yaml"), debug_overrides(
        out, "model.extra_modalities=[frames]", "data.source=frames_shapes", "data.shapes_train_size=64",
        "data.shapes_val_size=8", "data.max_caption_tokens=40", "train.log_every=1", "train.save_every=2", *extra))
    return cfg, train(cfg, evaluate_at_end=evaluate)


def _step_losses(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss_lm"], r["loss_flow"]) for r in rows if "loss_lm" in r and not r.get("final")}


def test_train_feeds_a_registered_plug_in_source_and_resumes_exactly(tmp_path, debug_vae):
    vae = f"codec.path={debug_vae}"
    cfg, straight = _run(tmp_path / "a", "train.steps=3", "train.eval_every=2", vae, evaluate=True)
    stream = build_stream(build_records(cfg.data), prepare_tokenizer(cfg), lambda keys, px: torch.zeros(
        len(keys), 4, 8, 8), cfg, Specials.of(prepare_tokenizer(cfg)))
    batch = next(stream)
    per_batch = examples_per_batch(cfg)
    assert batch.values[2].shape == (per_batch * N_FRAMES, FRAME)  # every example's frames are in its batch
    assert (batch.modality == 2).sum() == per_batch * N_FRAMES
    assert 0 < batch.n_images < per_batch  # records without an image pack their text and frames only
    # the third group and the frames adapter moved from their initial weights
    set_seed(cfg.train.seed)
    init = build_model(cfg.model, prepare_tokenizer(cfg).vocab_size).state_dict()
    final = load_file(straight / "model" / "model.safetensors")
    third = [k for k in final if ".groups.2." in k or k.startswith("adapters.2.")]
    assert third and all(not torch.equal(final[k], init[k]) for k in third)
    assert (straight / "checkpoints" / "step_000002").is_dir() and (straight / "checkpoints" / "step_000003").is_dir()
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_flow" in r]
    assert [r["step"] for r in val] == [2, 3]  # in-run at step 2, final at 3: images and the frames validated
    assert all(0 < r["val_flow_frames"] < 10 for r in val) and val[0]["val_flow_frames"] != val[1]["val_flow_frames"]
    assert (straight / "results.json").exists() and (straight / "samples_final.png").exists()  # evaluated, sampled
    assert (straight / "train.log").read_text().count("plug-in modalities ['frames'] are trained") == 1  # not sampled: said once
    # resume: 2 steps, then 1 more == 3 straight
    _run(tmp_path / "b", "train.steps=3", "train.stop_after=2", "train.eval_every=2", vae)
    _run(tmp_path / "b", "train.steps=3", "train.resume=auto", "train.eval_every=2", vae)
    assert _step_losses(tmp_path / "b")[3] == _step_losses(straight)[3]


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


def test_the_seq_len_check_counts_the_sources_plug_in_positions():
    # 4 markers + 40 caption tokens + 16 patches = 60 fit in 64, the source's 6 plug-in positions do not
    with pytest.raises(ConfigError, match=r"6 plug-in positions of data.source=frames_shapes .*needs >= 66"):
        debug_config("model.extra_modalities=[frames]", "data.source=frames_shapes", "data.seq_len=64",
                     "data.max_caption_tokens=40")
    debug_config("model.extra_modalities=[frames]", "data.source=frames_shapes", "data.seq_len=66",
                 "data.max_caption_tokens=40")


def test_codec_training_passes_over_records_without_an_image():
    from transfusion_mot.data.run_codec import _vae_images

    cfg = debug_config("data.source=frames_shapes", "data.shapes_train_size=12")
    images = _vae_images(FramesShapes(cfg.data, "train"), 32, batch_size=8)(0)
    assert images.shape == (8, 3, 32, 32)


def test_plug_in_validation_loss_does_not_depend_on_the_batch_size():
    from transfusion_mot.metrics.validation import plug_in_losses

    cfg = debug_config("model.extra_modalities=[frames]")
    torch.manual_seed(0)
    model = build_model(cfg.model, VOCAB)
    torch.nn.init.normal_(model.adapters[2].out.weight, std=0.1)  # a velocity head that is not zero yet
    docs = [[s for s in ex if not isinstance(s, Image)] for ex in _examples()]  # captions and frames
    one = plug_in_losses(model, docs, SPECIALS, cfg.flow, ("frames",), seed=5, batch_size=1)
    three = plug_in_losses(model, docs, SPECIALS, cfg.flow, ("frames",), seed=5, batch_size=3)
    assert set(one) == {"val_flow_frames"} and one["val_flow_frames"] > 0
    assert abs(one["val_flow_frames"] - three["val_flow_frames"]) < 1e-5
    assert plug_in_losses(model, docs, SPECIALS, cfg.flow, ("frames",), seed=6)["val_flow_frames"] != one[
        "val_flow_frames"]  # the seed is the noise's: another seed, another number
