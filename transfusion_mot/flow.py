"""Rectified flow, apart from the network (DiT's diffusion/, minRF's rf.py).

Time convention, everywhere in this codebase (diffusers' FlowMatchEulerDiscreteScheduler, SD3, BAGEL):

    x_t = (1 - t) * x0 + t * noise,    target v = noise - x0,    t = 1 is pure noise, t = 0 clean.

So dx_t/dt = v and sampling integrates from t = 1 down to t = 0: x_{t-dt} = x_t - dt * v.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import rng
from .config import FlowConfig, SampleConfig
from .data.packing import IGNORE, Batch
from .model.layers import patchify_each


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's resolution shift: more time near noise for shift > 1. Identity at shift = 1."""
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


def sample_t(n: int, cfg: FlowConfig, generator: torch.Generator | np.random.Generator | None = None) -> torch.Tensor:
    """(n,) training times in (0, 1): uniform or logit-normal, then shifted. ``generator``: a torch
    generator or a numpy one (a stream of ``rng.py``)."""
    logit_normal = cfg.t_sampling == "logit_normal"
    if isinstance(generator, np.random.Generator):
        draw = generator.standard_normal(n) if logit_normal else generator.random(n)
        u = torch.from_numpy(draw.astype(np.float32))
    else:
        u = torch.randn(n, generator=generator) if logit_normal else torch.rand(n, generator=generator)
    t = torch.sigmoid(cfg.logit_mean + cfg.logit_std * u) if logit_normal else u
    return shift_time(t, cfg.shift)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise, with t (N,) broadcast over (N, ...): (N, C, h, w) latents, or
    (P, C*p*p) patches with t per patch (``Batch.patch_time``)."""
    t = t.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def draw_t_and_noise(batch: Batch, cfg: FlowConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """t (N,) and noise (P, C*p*p), laid out as ``batch.patches``: image i's noise is drawn at its own
    latent shape (C, h, w), then patchified. Image i's t and its noise come from two streams of their own,
    keyed by ``(seed, batch.image_seed[i])`` (``rng.py``): the same data gets the same noise on any
    rank, any batch layout and after a resume, and neither depends on the data's own coins (caption
    order, dropout). Images that condition text (captioning) get t scaled into [0, cfg.caption_t_max],
    as Transfusion caps noise when an image is context for its caption."""
    keys = batch.image_seed.tolist()
    if not keys:
        return torch.zeros(0), torch.zeros_like(batch.patches, device="cpu")
    t = torch.cat([sample_t(1, cfg, rng.stream(seed, k, purpose="flow_t")) for k in keys])
    shapes = batch.image_shape.tolist()
    noise, _ = patchify_each([rng.normal(tuple(s), seed, k, purpose="flow_noise") for s, k in zip(shapes, keys)],
                             batch.patch_size)
    t = torch.where(batch.conditions_text.cpu(), t * cfg.caption_t_max, t)
    return t, noise


@dataclass
class LossParts:
    """Sums and counts, so the trainer can normalise by global counts (exact across ranks)."""

    lm_sum: torch.Tensor
    lm_count: torch.Tensor
    flow_sum: torch.Tensor
    flow_count: torch.Tensor
    aux: torch.Tensor

    def total(self, loss_weight: float, aux_weight: float = 0.0,
              lm_denom: torch.Tensor | None = None, flow_denom: torch.Tensor | None = None) -> torch.Tensor:
        """L_LM + lambda * L_flow (+ MoE aux), each a mean over its own elements."""
        lm = self.lm_sum / (self.lm_count if lm_denom is None else lm_denom).clamp(min=1)
        flow = self.flow_sum / (self.flow_count if flow_denom is None else flow_denom).clamp(min=1)
        return lm + loss_weight * flow + aux_weight * self.aux

    @property
    def lm(self) -> float:
        return float(self.lm_sum.detach() / self.lm_count.clamp(min=1))

    @property
    def flow(self) -> float:
        return float(self.flow_sum.detach() / self.flow_count.clamp(min=1))


def _errors(model, batch: Batch, cfg: FlowConfig, seed: int, t: torch.Tensor | None,
            noise: torch.Tensor | None):
    """One forward on the noised batch: (outputs, text targets (N_text,), squared velocity errors (P, C*p*p),
    plug-in modality m -> squared velocity errors (N_m, d_m))."""
    device = batch.tokens.device
    if t is None or noise is None:
        t_drawn, noise_drawn = draw_t_and_noise(batch, cfg, seed)
        t = t_drawn if t is None else t
        noise = noise_drawn if noise is None else noise
    t, noise = t.to(device), noise.to(device)
    x0 = batch.patches  # (P, C*p*p)
    t_patch = t.repeat_interleave(batch.patch_counts(), output_size=x0.shape[0])  # (P,) each image's t
    noised, time, value_noise = _noise_values(batch, cfg, seed)
    out = model(batch.replace(patches=add_noise(x0, noise, t_patch), t=t, values=noised, time=time))
    targets = batch.text_targets.reshape(-1)[out.text_index]
    value_err = {m: (out.values[m].float() - velocity_target(batch.values[m], e).float()).pow(2)
                 for m, e in value_noise.items()}
    if batch.n_images == 0:  # keep the (empty) velocity head in the graph
        return out, targets, out.velocity.float() * 0, value_err
    return out, targets, (out.velocity.float() - velocity_target(x0, noise).float()).pow(2), value_err


def _noise_values(batch: Batch, cfg: FlowConfig, seed: int):
    """Plug-in modalities: one t and one noise per span, keyed by (example key, index in the example,
    modality) (``rng.py``), so a span gets the same noise in any batch, as an image does (``image_seed``).
    Returns noised values, per-position times and the noise, each modality -> tensor."""
    noised, time, noise = {}, {}, {}
    for m, x0 in batch.values.items():
        spans = batch.value_spans[m].tolist()  # (length, example key, index in the example) per span
        t = torch.cat([sample_t(1, cfg, rng.stream(seed, key, j, m, purpose="flow_t")) for _, key, j in spans])
        e = torch.cat([rng.normal((n, x0.shape[1]), seed, key, j, m, purpose="flow_noise") for n, key, j in spans])
        t_pos = t.repeat_interleave(torch.tensor([n for n, _, _ in spans])).to(x0.device)
        noise[m], time[m] = e.to(x0.device, x0.dtype), t_pos
        noised[m] = add_noise(x0, noise[m], t_pos)
    return noised, time, noise


def loss_parts(model, batch: Batch, cfg: FlowConfig, seed: int,
               t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> LossParts:
    """Noise the batch's images, run the model once, and sum the LM and flow losses.

    ``t`` (N,) / ``noise`` (P, C*p*p) override the per-image draws (fixed-noise evaluation, overfitting tests).
    """
    out, targets, err, value_err = _errors(model, batch, cfg, seed, t, noise)
    lm_sum = F.cross_entropy(out.logits.float(), targets, ignore_index=IGNORE, reduction="sum")
    flow_sum = err.sum() + sum(e.sum() for e in value_err.values())  # plug-ins: one flow loss, element-weighted
    return LossParts(lm_sum=lm_sum, lm_count=(targets != IGNORE).sum(), flow_sum=flow_sum,
                     flow_count=torch.tensor(batch.flow_elements(), device=batch.tokens.device), aux=out.aux_loss)


def document_losses(model, batch: Batch, cfg: FlowConfig, seed: int) -> dict[str, torch.Tensor]:
    """Per document (doc ids 0..D-1): the LM and flow loss sums and counts, each (D,), from one forward with
    the same per-image t and noise as ``loss_parts`` (where a document is packed changes nothing)."""
    out, targets, err, _ = _errors(model, batch, cfg, seed, None, None)  # images only (plug-ins: not yet)
    nll = F.cross_entropy(out.logits.float(), targets, ignore_index=IGNORE, reduction="none")
    n_docs = int(batch.doc_id.max()) + 1
    text_doc = batch.doc_id.reshape(-1)[out.text_index]
    keep = targets != IGNORE
    zeros = torch.zeros(n_docs, dtype=torch.float32, device=err.device)
    image_doc = batch.doc_id.reshape(-1)[(batch.image_id.reshape(-1) >= 0)]  # (P,) document of each patch
    return {"lm_sum": zeros.index_add(0, text_doc[keep], nll[keep]),
            "lm_count": zeros.index_add(0, text_doc[keep], torch.ones_like(nll[keep])),
            "flow_sum": zeros.index_add(0, image_doc, err.sum(1)),
            "flow_count": zeros.index_add(0, image_doc, torch.full_like(err[:, 0], err.shape[1]))}


def time_grid(steps: int, shift: float = 1.0) -> list[float]:
    """t values from 1 to 0 for an Euler sampler with ``steps`` steps (shifted like training)."""
    ts = torch.linspace(1.0, 0.0, steps + 1)
    return shift_time(ts, shift).tolist()


@torch.no_grad()
def euler_sample(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
                 steps: int = SampleConfig.steps, shift: float = 1.0, grid: list[float] | None = None,
                 progress: bool = False) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from t = 1 (``noise``) to t = 0. ``velocity(x, t)`` gets t as (N,);
    ``grid`` (decreasing t values from 1 to 0) replaces the uniform, shifted one."""
    from tqdm.auto import tqdm

    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    grid = grid or time_grid(steps, shift)
    x = noise
    for t_now, t_next in tqdm(list(zip(grid[:-1], grid[1:])), desc="sampling", disable=not progress, leave=False):
        t = torch.full((x.shape[0],), t_now, device=x.device)
        x = x + (t_next - t_now) * velocity(x, t).to(x.dtype)
    return x


def cfg_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: scale 1 = conditional, 0 = unconditional."""
    return v_uncond + scale * (v_cond - v_uncond)


def diffusion_val_grid(n: int) -> torch.Tensor:
    """The fixed t values of the diffusion validation loss: n evenly spaced midpoints in (0, 1)."""
    return (torch.arange(n, dtype=torch.float64) + 0.5).div(n).float()
