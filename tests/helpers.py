"""Tiny builders shared by the tests (debug-size model, hand-made mixed batches)."""
from __future__ import annotations

import torch

from transfusion_mot.config import load_config
from transfusion_mot.data.packing import Specials, pack
from transfusion_mot.data.segments import Image, Text
from transfusion_mot.model import build_model

SPECIALS = Specials(bos=256, eos=257, pad=258, boi=259, eoi=260)
VOCAB = 261


def debug_config(*overrides: str):
    """The debug size at configs/debug.yaml's 32 px: 4 x 8 x 8 latents through the trained 4x VAE."""
    return load_config(None, ["model.size=debug", "data.resolution=32", *overrides])


def debug_model(*overrides: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = debug_config(*overrides)
    return build_model(cfg.model, VOCAB), cfg


def mixed_examples(seed: int = 0, n: int = 4, channels: int = 4, size: int = 8) -> list[list]:
    """Caption->image, image->caption and text-only documents with random ids and latents."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, 256, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
        lat = torch.randn(channels, size, size, generator=g)
        kind = i % 3
        out.append([Text(ids), Image(lat)] if kind == 0 else [Image(lat), Text(ids)] if kind == 1 else [Text(ids)])
    return out


def mixed_batch(seed: int = 0, n: int = 4, seq_len: int = 96, t: float | None = 0.5):
    b = pack(mixed_examples(seed, n), seq_len, SPECIALS, patch_size=2)
    if t is not None:
        b.t = torch.full((b.n_images,), t)
    return b


def train_recording(cfg, monkeypatch, evaluate_at_end: bool = False):
    """Train in-process; returns (train()'s result, the micro-batches of every step it ran, one list per step)."""
    from transfusion_mot import train as train_mod

    steps = []
    original = train_mod.micro_batches

    def spy(stream, n, device):
        batches = original(stream, n, device)
        steps.append(batches)
        return batches

    monkeypatch.setattr(train_mod, "micro_batches", spy)
    try:
        result = train_mod.train(cfg, evaluate_at_end=evaluate_at_end)
    finally:
        monkeypatch.setattr(train_mod, "micro_batches", original)
    return result, steps
