"""Validation losses that compare across runs: diffusion loss on a fixed t grid with fixed noise (SD3,
MoT paper), text perplexity, and the two conditional losses (text->image, image->text).

Every number here is a sum over examples divided by a count, computed on fixed examples with
per-example seeded noise, so two calls, two batch sizes or two checkpoints give comparable numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import rng
from ..data.packing import IGNORE, Specials, pack
from ..data.segments import Image, Text
from ..flow import add_noise, diffusion_val_grid, velocity_target
from ..model.layers import patchify_each


@dataclass
class Pair:
    """One held-out captioned image: latent (C, h, w) and caption ids."""

    latent: torch.Tensor
    caption_ids: list[int]


@dataclass
class ValResult:
    flow_by_t: dict[float, float] = field(default_factory=dict)  # text->image flow loss per t
    flow: float = float("nan")  # mean over the t grid (the diffusion validation loss)
    text_nll: float = float("nan")  # caption NLL per token with no image (perplexity = exp)
    caption_nll: float = float("nan")  # image->text: caption NLL per token given the clean image

    @property
    def perplexity(self) -> float:
        return math.exp(self.text_nll) if math.isfinite(self.text_nll) else float("nan")

    def to_dict(self) -> dict:
        return {"val_flow": self.flow, "val_lm": self.text_nll, "val_ppl": self.perplexity,
                "val_caption_nll": self.caption_nll,
                **{f"val_flow_t{t:.3f}": v for t, v in self.flow_by_t.items()}}


def _fixed_noise(pairs: list[Pair], seed: int) -> list[torch.Tensor]:
    return [rng.normal(p.latent.shape, seed, i, purpose="val_noise") for i, p in enumerate(pairs)]


def _seq_len(pairs: list[Pair], patch_size: int) -> int:
    longest = max(len(p.caption_ids) for p in pairs)
    return 4 + longest + max((q.latent.shape[-2] // patch_size) * (q.latent.shape[-1] // patch_size) for q in pairs)


@torch.no_grad()
def validation_losses(model, pairs: list[Pair], specials: Specials, grid: int = 8, seed: int = 1234,
                      batch_size: int = 16, text: bool = True) -> ValResult:
    """All validation numbers on ``pairs``. One document per row, and the model in eval mode (MoE-4x routes
    each token by itself there), so the batch size changes nothing."""
    if not pairs:
        raise ValueError("validation needs at least one held-out pair")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    p = model.cfg.patch_size
    seq = _seq_len(pairs, p)
    noise = _fixed_noise(pairs, seed)
    ts = diffusion_val_grid(grid)
    flow_sum = torch.zeros(grid, dtype=torch.float64)
    n_elem = 0
    nll = {"text": [0.0, 0], "caption": [0.0, 0]}
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        x0, _ = patchify_each([q.latent.float() for q in chunk], p)  # (P, C*p*p): sizes may differ
        eps, _ = patchify_each(noise[start:start + batch_size], p)
        t2i = pack([[Text(q.caption_ids), Image(q.latent)] for q in chunk], seq, specials, p).to(device)
        n_elem += x0.numel()
        for k, t in enumerate(ts.tolist()):
            tt = torch.full((len(chunk),), t)
            out = model(t2i.replace(patches=add_noise(x0, eps, torch.full((x0.shape[0],), t)).to(device),
                                    t=tt.to(device)))
            err = (out.velocity.float().cpu() - velocity_target(x0, eps)).pow(2)
            flow_sum[k] += err.double().sum()
            if text and k == 0:  # caption before the image: its loss ignores the image (text perplexity)
                _add_nll(nll["text"], out, t2i, specials, after_image=False)
        if text:  # image -> text: clean image first, then the caption
            i2t = pack([[Image(q.latent), Text(q.caption_ids)] for q in chunk], seq, specials, p).to(device)
            out = model(i2t.replace(t=torch.zeros(len(chunk), device=device)))
            _add_nll(nll["caption"], out, i2t, specials, after_image=True)
    model.train(was_training)
    by_t = {round(float(t), 4): float(s / n_elem) for t, s in zip(ts, flow_sum)}
    return ValResult(flow_by_t=by_t, flow=float(flow_sum.sum() / (n_elem * grid)),
                     text_nll=nll["text"][0] / max(nll["text"][1], 1) if text else float("nan"),
                     caption_nll=nll["caption"][0] / max(nll["caption"][1], 1) if text else float("nan"))


def _add_nll(acc: list, out, batch, specials: Specials, after_image: bool) -> None:
    """Sum the NLL of the caption's tokens (+ EOS): never the BOI decision; the step from EOI to the
    caption counts only when the caption follows the image (captioning)."""
    targets = batch.text_targets.reshape(-1)[out.text_index]
    inputs = batch.tokens.reshape(-1)[out.text_index]
    keep = (targets != IGNORE) & (targets != specials.boi)
    if not after_image:
        keep &= inputs != specials.eoi
    loss = F.cross_entropy(out.logits.float()[keep], targets[keep], reduction="sum")
    acc[0] += float(loss)
    acc[1] += int(keep.sum())


@torch.no_grad()
def next_token_validation(model, pairs: list[Pair], specials: Specials, batch_size: int = 16) -> dict:
    """The Chameleon setting's validation (``pairs`` hold VQ codes (h, w) as ``latent``): image-code NLL
    per code given the caption (text->image), caption NLL with no image before it (perplexity), and
    caption NLL given the image (image->text), each a sum over the held-out pairs divided by its count."""
    from ..data.segments import ImageTokens
    from ..model.chameleon import next_token_predict

    if not pairs:
        raise ValueError("validation needs at least one held-out pair")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    seq = 4 + max(len(p.caption_ids) for p in pairs) + pairs[0].latent.numel()
    acc = {"image": [0.0, 0], "text": [0.0, 0], "caption": [0.0, 0]}
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        codes = [ImageTokens(q.latent.round().long()) for q in chunk]
        for order in ("t2i", "i2t"):
            docs = [[Text(q.caption_ids), c] if order == "t2i" else [c, Text(q.caption_ids)] for q, c in zip(chunk, codes)]
            b = pack(docs, seq, specials, 1).to(device)
            predict = next_token_predict(b.modality, b.text_targets)
            out = model(b, predict=predict)
            targets = b.text_targets.reshape(-1)
            inputs = b.tokens.reshape(-1)
            if order == "t2i":
                img = F.cross_entropy(out.logits[1].float(), targets[out.index[1]], reduction="sum")
                acc["image"][0] += float(img)
                acc["image"][1] += out.index[1].numel()
            text_t, text_in = targets[out.index[0]], inputs[out.index[0]]
            # as _add_nll: the caption's tokens (+ EOS after an image), never the BOI / EOI decisions
            keep = (text_t != IGNORE) & (text_t != specials.boi) & (text_t != specials.eoi)
            if order == "t2i":
                keep &= text_in != specials.eoi
            key = "text" if order == "t2i" else "caption"
            acc[key][0] += float(F.cross_entropy(out.logits[0].float()[keep], text_t[keep], reduction="sum"))
            acc[key][1] += int(keep.sum())
    model.train(was_training)
    mean = {k: s / max(n, 1) for k, (s, n) in acc.items()}
    return {"val_image_nll": mean["image"], "val_lm": mean["text"], "val_ppl": math.exp(mean["text"]),
            "val_caption_nll": mean["caption"]}


@torch.no_grad()
def plug_in_losses(model, docs: list[list], specials: Specials, flow_cfg, extra: tuple, seed: int,
                   batch_size: int = 16) -> dict[str, float]:
    """``val_flow_<name>`` per plug-in modality: its flow loss on held-out documents (caption + the record's
    plug-in segments of that modality). Each span's t and noise are keyed by its document's index
    (``pack(example_keys=...)``), so the batch size changes nothing."""
    from ..data.packing import document_length
    from ..flow import loss_parts

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = {}
    for name in extra:
        own = [(i, [s for s in d if isinstance(s, Text) or getattr(s, "modality", "") == name])
               for i, d in enumerate(docs)]
        own = [(i, d) for i, d in own if len(d) > 1]  # documents that hold this modality
        err, count = 0.0, 0
        for start in range(0, len(own), batch_size):
            keys, chunk = zip(*own[start:start + batch_size])
            seq = max(document_length(d, patch_size=model.cfg.patch_size) for d in chunk)
            batch = pack(list(chunk), seq, specials, model.cfg.patch_size, extra_modalities=extra,
                         example_keys=list(keys)).to(device)
            parts = loss_parts(model, batch, flow_cfg, seed)
            err, count = err + float(parts.flow_sum), count + int(parts.flow_count)
        if count:
            out[f"val_flow_{name}"] = err / count
    model.train(was_training)
    return out
