"""Generation: images by flow (Euler from t=1 to t=0, CFG, cached prompt), text with a KV cache,
interleaved text and images, and captioning (DESIGN §3).

Every sequence here is one document laid out exactly as in training (``data/packing.py``): a prompt is
``BOS, ids..., BOI`` and the image's patches follow it; captioning context is ``BOS, BOI, patches, EOI``.
Rows of different prompt lengths are left-padded with padding tokens (doc id -1), which the
Transfusion mask isolates, so a row's result does not depend on what else is in the batch (for MoE-4x
too: sampling runs in eval mode, where every token is routed by itself, ``MoEFeedForward``).

The prompt is the same at every flow step, and image patches never attend to anything after them, so
the prompt's keys/values are computed once (``Context.feed``) and each step runs only the image tokens
against that frozen cache (``Context.image_velocity``). ``use_cache=False`` recomputes the whole
sequence every step; the two agree to float precision (tested).
"""
from __future__ import annotations

import math
import warnings

import torch
from tqdm.auto import tqdm

from . import rng
from .config import SCHEDULERS, SampleConfig
from .data.packing import IMAGE, TEXT, Specials
from .data.segments import Image, Text
from .flow import cfg_velocity, euler_sample, time_grid
from .model.inputs import ModelInput
from .model.layers import patchify_each, unpatchify
from .model.masks import flex_block_mask, transfusion_mask
from .model.mot import KVCache


# --------------------------------------------------------------------------------------------------
# Context: a batch of documents being extended, with their keys/values cached.
# --------------------------------------------------------------------------------------------------
class Context:
    """Rows of one document each. Tracks, per cached key, its document id (0, or -1 for left padding),
    image id and column, so the mask for new queries is the training mask restricted to new rows."""

    def __init__(self, model, n_rows: int, device):
        self.model = model
        self.device = device
        self.n_rows = n_rows
        self.cache = KVCache(model.cfg.n_layers)
        self.doc = torch.zeros(n_rows, 0, dtype=torch.long, device=device)
        self.img = torch.zeros(n_rows, 0, dtype=torch.long, device=device)
        self.next_pos = torch.zeros(n_rows, dtype=torch.long, device=device)  # RoPE position of the next token
        self.n_images = 0  # image ids handed out so far (unique per context)
        self._image_mask: tuple = (None, None)  # (key, mask) of the flow steps' queries

    @property
    def length(self) -> int:
        return self.doc.shape[1]

    def _mask(self, q_doc, q_img):
        """New queries against cached + new keys: the training rule, as a BlockMask when the model runs
        flex attention (``model.attention``), else SDPA's boolean mask."""
        t_new = q_doc.shape[1]
        k_doc = torch.cat([self.doc, q_doc], 1)
        k_img = torch.cat([self.img, q_img], 1)
        if getattr(self.model, "uses_flex", lambda device: False)(self.device):  # stand-in models: SDPA
            return flex_block_mask(q_doc, q_img, k_doc, k_img, q_offset=self.length)
        cols = torch.arange(self.length + t_new, device=self.device).expand(self.n_rows, -1)
        return transfusion_mask(q_doc, q_img, cols[:, self.length:], k_doc, k_img, cols)

    def _batch(self, tokens, modality, doc, img, latents, t) -> ModelInput:
        steps = (doc >= 0).long().cumsum(1) - 1  # positions continue each row's document
        position = torch.where(doc >= 0, self.next_pos[:, None] + steps, torch.zeros_like(steps))
        return _latent_batch(tokens, modality, doc, img, position, latents, t, self.model.cfg)

    def feed_text(self, ids: list[list[int]], pad: int):
        """Append text tokens (rows left-padded to the same length); returns the last position's logits."""
        width = max(len(x) for x in ids)
        tokens = torch.full((self.n_rows, width), pad, dtype=torch.long)
        doc = torch.full((self.n_rows, width), -1, dtype=torch.long)
        for r, x in enumerate(ids):
            if x:
                tokens[r, width - len(x):] = torch.tensor(x)
                doc[r, width - len(x):] = 0
        tokens, doc = tokens.to(self.device), doc.to(self.device)
        img = torch.full_like(doc, -1)
        out = self._run(tokens, torch.full_like(doc, TEXT), doc, img, None, None)
        return self._last_logits(out, doc)

    def _last_logits(self, out, doc):
        """Logits at each row's last real token (left padding makes that the last column)."""
        flat_index = torch.arange(self.n_rows, device=self.device) * doc.shape[1] + doc.shape[1] - 1
        where = torch.searchsorted(out.text_index, flat_index)
        return out.logits[where]

    def feed_image(self, latents: torch.Tensor, eoi: int, pad: int):
        """Append clean image patches (t=0) followed by EOI; returns the logits after EOI."""
        p = self.model.cfg.patch_size
        n = (latents.shape[-2] // p) * (latents.shape[-1] // p)
        img_ids = self.n_images + torch.arange(self.n_rows, device=self.device)
        self.n_images += self.n_rows
        tokens = torch.full((self.n_rows, n + 1), pad, dtype=torch.long, device=self.device)
        tokens[:, -1] = eoi
        modality = torch.full_like(tokens, IMAGE)
        modality[:, -1] = TEXT
        img = img_ids[:, None].expand(-1, n + 1).clone()
        img[:, -1] = -1
        doc = torch.zeros_like(tokens)
        out = self._run(tokens, modality, doc, img, latents, torch.zeros(self.n_rows, device=self.device))
        return out.logits  # one text position per row: EOI

    def _run(self, tokens, modality, doc, img, latents, t):
        batch = self._batch(tokens, modality, doc, img, latents, t)
        out = self.model(batch, mask=self._mask(doc, img), cache=self.cache)
        self.doc = torch.cat([self.doc, doc], 1)
        self.img = torch.cat([self.img, img], 1)
        self.next_pos = self.next_pos + (doc >= 0).sum(1)
        return out

    def image_velocity(self, x: torch.Tensor, t: torch.Tensor, pad: int) -> torch.Tensor:
        """Velocity for noised latents ``x`` (rows, C, h, w) at times ``t``, attending to the frozen
        context: only the image tokens are computed, nothing is appended."""
        p = self.model.cfg.patch_size
        n = (x.shape[-2] // p) * (x.shape[-1] // p)
        tokens = torch.full((self.n_rows, n), pad, dtype=torch.long, device=self.device)
        img = (self.n_images + torch.arange(self.n_rows, device=self.device))[:, None].expand(-1, n)
        doc = torch.zeros_like(tokens)
        batch = self._batch(tokens, torch.full_like(tokens, IMAGE), doc, img, x, t)
        frozen = KVCache(len(self.cache.k), frozen=True)
        frozen.k, frozen.v = self.cache.k, self.cache.v
        key = (self.length, self.n_images, n)  # every flow step of one image attends alike: one mask
        if self._image_mask[0] != key:
            self._image_mask = (key, self._mask(doc, img))
        return _velocity_latents(self.model(batch, mask=self._image_mask[1], cache=frozen).velocity, x, p)


def _latent_batch(tokens, modality, doc, img, position, latents: torch.Tensor | None, t, cfg) -> ModelInput:
    """The model's input from (N, C, h, w) latents of one size (or none) at times t (N,)."""
    device = tokens.device
    if latents is None:
        latents = torch.zeros(0, cfg.latent_channels, cfg.patch_size, cfg.patch_size, device=device)
    patches, shape = patchify_each(latents, cfg.patch_size)
    n = latents.shape[0]
    return ModelInput(tokens=tokens, modality=modality, doc_id=doc, image_id=img, position=position,
                      patches=patches, image_shape=shape.to(device),
                      t=t if t is not None else torch.zeros(n, device=device))


def _velocity_latents(velocity: torch.Tensor, like: torch.Tensor, p: int) -> torch.Tensor:
    """The model's flat per-patch velocities (P, C*p*p) back to latents shaped like ``like`` (N, C, h, w)."""
    n, c, h, w = like.shape
    return unpatchify(velocity.reshape(n, -1, velocity.shape[1]), p, c, h, w)


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------
MAX_SEED = 2 ** 63 - 1  # a seed is a signed 64-bit integer (recorded in reports, passed to numpy / torch)


def _check_args(steps: int, cfg_scale: float, seed: int = 0) -> None:
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    if not math.isfinite(cfg_scale) or cfg_scale < 0:
        raise ValueError(f"cfg_scale={cfg_scale} must be a finite number >= 0 (1 = no guidance, 0 = unconditional)")
    if not -MAX_SEED <= seed <= MAX_SEED:
        raise ValueError(f"seed={seed} must lie in [-{MAX_SEED}, {MAX_SEED}] (a signed 64-bit integer)")


def time_steps(steps: int, scheduler: str = SampleConfig.scheduler, shift: float = 1.0) -> list[float]:
    """Decreasing t values from 1 to 0. ``scheduler`` other than "euler" takes the sigmas of that
    diffusers flow-matching scheduler (same convention: sigma = t); only schedulers whose grid is all
    that matters are accepted (``config.SCHEDULERS``), since sampling takes Euler steps on that grid."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"sample.scheduler={scheduler!r} is not one of {SCHEDULERS}: sampling takes only a "
                         f"scheduler's sigma grid and integrates with Euler steps")
    if scheduler == "euler":
        return time_grid(steps, shift)
    import diffusers

    sched = getattr(diffusers, scheduler)(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(steps)
    sigmas = sched.sigmas.tolist()
    return sigmas if sigmas[-1] == 0.0 else sigmas + [0.0]


def _initial_noise(shape, seed: int, keys: list[int], device) -> torch.Tensor:
    """One stream per image (``rng.py``): an image's noise depends on (seed, its key) only, not on the batch."""
    return torch.stack([rng.normal(shape, seed, k, purpose="sample_noise") for k in keys]).to(device)


@torch.no_grad()
def sample_latents(model, ctx_ids: list[list[int]], specials: Specials, noise: torch.Tensor,
                   steps: int = SampleConfig.steps, cfg_scale: float = SampleConfig.cfg_scale,
                   scheduler: str = SampleConfig.scheduler, shift: float = 1.0,
                   use_cache: bool = True, progress: bool = False,
                   uncond_ids: list[list[int]] | None = None) -> torch.Tensor:
    """Latents for rows whose context is ``BOS, ctx_ids[r], BOI``; ``noise`` (rows, C, h, w) at t=1.

    With CFG (scale != 1) the unconditional rows (``BOS, BOI``: the caption-dropout layout; with a
    negative prompt ``BOS, uncond_ids[r], BOI``) ride in the same batch as the conditional ones.
    """
    _check_args(steps, cfg_scale)
    rows = len(ctx_ids)
    guided = cfg_scale != 1.0
    prefixes = [[specials.bos, *x, specials.boi] for x in ctx_ids]
    if guided:
        prefixes += [[specials.bos, *x, specials.boi] for x in (uncond_ids or [[]] * rows)]
    device = noise.device
    if use_cache:
        ctx = Context(model, len(prefixes), device)
        ctx.feed_text(prefixes, specials.pad)
        velocity = lambda x, t: ctx.image_velocity(x, t, specials.pad)  # noqa: E731
    else:
        velocity = lambda x, t: _uncached_velocity(model, prefixes, x, t, specials)  # noqa: E731
    if guided:  # conditional and unconditional rows in one call
        one_batch = velocity

        def velocity(x, t):
            v = one_batch(torch.cat([x, x]), torch.cat([t, t])).float()
            return cfg_velocity(v[:rows], v[rows:], cfg_scale)
    return euler_sample(velocity, noise, steps, grid=time_steps(steps, scheduler, shift), progress=progress)


def _uncached_velocity(model, prefixes: list[list[int]], x: torch.Tensor, t: torch.Tensor, specials: Specials):
    """The reference: the whole left-padded sequence (prefix + image patches) through the model."""
    p = model.cfg.patch_size
    n = (x.shape[-2] // p) * (x.shape[-1] // p)
    width = max(len(q) for q in prefixes)
    rows = len(prefixes)
    tokens = torch.full((rows, width + n), specials.pad, dtype=torch.long)
    doc = torch.full_like(tokens, -1)
    position = torch.zeros_like(tokens)
    for r, q in enumerate(prefixes):
        tokens[r, width - len(q):width] = torch.tensor(q)
        doc[r, width - len(q):] = 0
        position[r, width - len(q):] = torch.arange(len(q) + n)
    modality = torch.zeros_like(tokens)
    modality[:, width:] = IMAGE
    img = torch.full_like(tokens, -1)
    img[:, width:] = torch.arange(rows)[:, None]
    dev = x.device
    batch = _latent_batch(tokens.to(dev), modality.to(dev), doc.to(dev), img.to(dev), position.to(dev), x, t, model.cfg)
    return _velocity_latents(model(batch).velocity, x, p)


@torch.no_grad()
def generate_images(model, prompt_ids: list[list[int]], specials: Specials, steps: int = SampleConfig.steps,
                    cfg_scale: float = SampleConfig.cfg_scale, seed: int = SampleConfig.seed,
                    n_per_prompt: int = SampleConfig.n_per_prompt, batch_size: int = 16,
                    scheduler: str = SampleConfig.scheduler, shift: float = 1.0, use_cache: bool = True,
                    progress: bool = False,
                    first_index: int = 0, negative_ids: list[list[int]] | None = None,
                    noise: torch.Tensor | None = None) -> torch.Tensor:
    """Latents (len(prompts) * n_per_prompt, C, h, w), prompt-major. Image k's noise is the stream
    ``(seed, first_index + k)`` of ``rng.py``: the same seed gives the same images whatever the batch size,
    and a long job can be generated in pieces (``first_index``) with the same result. ``noise`` given
    (one (C, h, w) per image, from the caller's generators) replaces those streams; ``negative_ids[i]``
    is prompt i's unconditional context (None: ``BOS, BOI``)."""
    _check_args(steps, cfg_scale, seed)
    if not prompt_ids:
        raise ValueError("no prompts given")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if negative_ids is not None and len(negative_ids) != len(prompt_ids):
        raise ValueError(f"{len(negative_ids)} negative prompts for {len(prompt_ids)} prompts")
    cfg = model.cfg
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    shape = (cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    jobs = [(i, j) for i in range(len(prompt_ids)) for j in range(n_per_prompt)]
    if noise is not None and tuple(noise.shape) != (len(jobs), *shape):
        raise ValueError(f"noise of shape {tuple(noise.shape)} given for {len(jobs)} images of {shape}")
    out = []
    bar = tqdm(total=len(jobs), desc="images", disable=not progress)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        if noise is None:
            x1 = _initial_noise(shape, seed, [first_index + start + k for k in range(len(chunk))], device)
        else:
            x1 = noise[start:start + len(chunk)].to(device=device, dtype=torch.float32)
        ids = [prompt_ids[i] for i, _ in chunk]
        neg = None if negative_ids is None else [negative_ids[i] for i, _ in chunk]
        out.append(sample_latents(model, ids, specials, x1, steps, cfg_scale, scheduler, shift, use_cache,
                                  uncond_ids=neg))
        bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    return torch.cat(out)


# --------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------
def pick_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """(rows, V) -> (rows,). temperature 0 = greedy; top-k then nucleus (top-p) filtering."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1).cpu()
    return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(logits.device)


def _decode(ctx: Context, logits: torch.Tensor, specials: Specials, max_new_tokens: int, temperature: float,
            top_k: int, top_p: float, generator: torch.Generator, stop_at_boi: bool = False,
            banned: tuple[int, ...] = (), min_new_tokens: int = 0) -> list[list[int]]:
    """Sample tokens row by row until EOS (or BOI when ``stop_at_boi``); the KV cache grows by one
    token per step. Finished rows keep feeding padding-free EOS tokens that nobody reads."""
    rows = ctx.n_rows
    out: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    stops = {specials.eos} | ({specials.boi} if stop_at_boi else set())
    for step in range(max_new_tokens):
        ban = list(banned) + ([specials.eos] if step < min_new_tokens else [])
        if ban or 0 < specials.vocab < logits.shape[-1]:
            logits = logits.clone()
            logits[:, ban] = float("-inf")
            logits[:, specials.vocab or logits.shape[-1]:] = float("-inf")  # the head's rows past the tokenizer
        tok = pick_token(logits, temperature, top_k, top_p, generator)
        for r in range(rows):
            if not done[r]:
                out[r].append(int(tok[r]))
                done[r] = int(tok[r]) in stops
        if all(done) or step == max_new_tokens - 1:
            break
        logits = ctx.feed_text([[int(x)] for x in tok], specials.pad)
    return out


@torch.no_grad()
def generate_text(model, prompt_ids: list[list[int]], specials: Specials,
                  max_new_tokens: int = SampleConfig.max_new_tokens, temperature: float = SampleConfig.temperature,
                  top_k: int = SampleConfig.top_k, top_p: float = SampleConfig.top_p, seed: int = SampleConfig.seed,
                  min_new_tokens: int = 0) -> list[list[int]]:
    """Continue ``BOS, prompt`` for each row with a KV cache; stops at EOS (kept) or max_new_tokens.
    Image markers are banned here: use ``generate_interleaved`` for text that may contain images."""
    device = next(model.parameters()).device
    model.eval()
    ctx = Context(model, len(prompt_ids), device)
    logits = ctx.feed_text([[specials.bos, *x] for x in prompt_ids], specials.pad)
    gen = rng.torch_generator(seed, purpose="decode")
    return _decode(ctx, logits, specials, max_new_tokens, temperature, top_k, top_p, gen,
                   banned=(specials.boi, specials.eoi, specials.pad, specials.bos), min_new_tokens=min_new_tokens)


@torch.no_grad()
def caption_images(model, latents: torch.Tensor, specials: Specials, max_new_tokens: int = SampleConfig.max_new_tokens,
                   temperature: float = SampleConfig.temperature, top_k: int = SampleConfig.top_k,
                   top_p: float = SampleConfig.top_p, seed: int = SampleConfig.seed) -> list[list[int]]:
    """Captions for clean latents (N, C, h, w): context ``BOS, BOI, patches (t=0), EOI``, then text.
    Returned ids stop before EOS."""
    device = next(model.parameters()).device
    model.eval()
    ctx = Context(model, latents.shape[0], device)
    ctx.feed_text([[specials.bos, specials.boi]] * latents.shape[0], specials.pad)
    logits = ctx.feed_image(latents.to(device), specials.eoi, specials.pad)
    gen = rng.torch_generator(seed, purpose="decode")
    ids = _decode(ctx, logits, specials, max_new_tokens, temperature, top_k, top_p, gen,
                  banned=(specials.boi, specials.eoi, specials.pad, specials.bos))
    return [x[:-1] if x and x[-1] == specials.eos else x for x in ids]


@torch.no_grad()
def generate_interleaved(model, prompt_ids: list[int], specials: Specials,
                         max_new_tokens: int = SampleConfig.max_new_tokens, max_images: int = 2,
                         steps: int = SampleConfig.steps, cfg_scale: float = SampleConfig.cfg_scale,
                         temperature: float = SampleConfig.temperature, top_k: int = SampleConfig.top_k,
                         top_p: float = SampleConfig.top_p, seed: int = SampleConfig.seed, min_new_tokens: int = 0,
                         scheduler: str = SampleConfig.scheduler, shift: float = 1.0) -> list:
    """One document: text until the model emits BOI, then an image by flow (conditioned on everything
    so far; CFG against the unconditional ``BOS, BOI``), its clean latents appended, then text again.
    A prompt ending in BOI starts with an image. Returns segments ``[Text, Image, Text, ...]``."""
    _check_args(steps, cfg_scale, seed)
    device = next(model.parameters()).device
    model.eval()
    cfg = model.cfg
    shape = (cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    gen = rng.torch_generator(seed, purpose="decode")
    starts_with_image = bool(prompt_ids) and prompt_ids[-1] == specials.boi
    text = list(prompt_ids[:-1] if starts_with_image else prompt_ids)
    ctx = Context(model, 1, device)
    logits = ctx.feed_text([[specials.bos, *prompt_ids]], specials.pad)
    segments: list = []
    budget, n_images, pending_image = max_new_tokens, 0, starts_with_image
    while True:
        if pending_image:
            if text:
                segments.append(Text(text))
            grid = time_steps(steps, scheduler, shift)
            latent = _image_in_context(ctx, specials, shape, grid, cfg_scale, seed, n_images, device)
            segments.append(Image(latent[0].cpu()))
            n_images += 1
            logits = ctx.feed_image(latent, specials.eoi, specials.pad)
            text, pending_image = [], False
        if budget <= 0:
            break
        banned = (specials.eoi, specials.pad, specials.bos) + ((specials.boi,) if n_images >= max_images else ())
        ids = _decode(ctx, logits, specials, budget, temperature, top_k, top_p, gen, stop_at_boi=True, banned=banned,
                      min_new_tokens=min_new_tokens if n_images >= max_images else 0)[0]
        budget -= len(ids)
        if ids and ids[-1] == specials.boi:
            text += ids[:-1]
            logits = ctx.feed_text([[specials.boi]], specials.pad)
            pending_image = True
            continue
        text += [i for i in ids if i != specials.eos]
        break
    if text:
        segments.append(Text(text))
    return segments


def _image_in_context(ctx: Context, specials: Specials, shape, grid: list[float], cfg_scale: float, seed: int,
                      index: int, device):
    """Flow-sample one image whose context is ``ctx`` (ending in BOI), with CFG via a second,
    unconditional context ``BOS, BOI``."""
    uncond = None
    if cfg_scale != 1.0:
        uncond = Context(ctx.model, 1, device)
        uncond.feed_text([[specials.bos, specials.boi]], specials.pad)

    def velocity(x, t):
        v = ctx.image_velocity(x, t, specials.pad).float()
        return v if uncond is None else cfg_velocity(v, uncond.image_velocity(x, t, specials.pad).float(), cfg_scale)

    return euler_sample(velocity, _initial_noise(shape, seed, [index], device), len(grid) - 1, grid=grid)


def truncate_prompt(ids: list[int], limit: int) -> list[int]:
    """Prompts longer than the model's caption budget are cut (with a warning), as in training."""
    if len(ids) > limit:
        warnings.warn(f"prompt of {len(ids)} tokens truncated to data.max_caption_tokens={limit}", stacklevel=2)
        return ids[:limit]
    return ids
