"""Generation in the Chameleon setting: images as sampled VQ codes, captions of images given as codes.

Sequences are laid out as in training (``data/packing.py``): an image prompt is ``BOS, ids..., BOI`` and
the codes follow it one by one, each fed back through the KV cache (``TokenContext``); captioning context
is ``BOS, BOI, codes, EOI``. Classifier-free guidance acts on logits, Lumina-mGPT style: the
unconditional rows (``BOS, BOI``: the caption-dropout layout) ride in the same batch as the conditional
ones, and each code is drawn from ``uncond + s * (cond - uncond)`` with ``sample.temperature`` /
``top_k`` / ``top_p``. Image k draws from its own stream ``(seed, first_index + k)`` (``rng.py``), so
the batch size never changes an image. ``use_cache=False`` recomputes the whole sequence for every
code: the reference the cached path is tested against.
"""
from __future__ import annotations

import torch

from . import rng
from .config import SampleConfig
from .data.packing import IMAGE, TEXT, Specials
from .sample import MAX_SEED, Context, _decode, pick_token


class TokenContext(Context):
    """``Context`` for a model whose every position is a discrete token (``model/chameleon.py``): each
    feed returns the logits of the row's last position from the head of the modality asked for."""

    def feed(self, tokens: torch.Tensor, modality: torch.Tensor, head: int, doc: torch.Tensor | None = None):
        """Append ``tokens`` (rows, w) of ``modality`` (rows, w); returns (rows, V_head) logits at the last column."""
        doc = torch.zeros_like(tokens) if doc is None else doc
        img = torch.full_like(doc, -1)  # no bidirectional spans: image codes are causal
        predict = torch.full_like(tokens, -1)
        predict[:, -1] = head
        batch = self._batch(tokens, modality, doc, img, None, None)
        out = self.model(batch, mask=self._mask(doc, img), cache=self.cache, predict=predict)
        self.doc = torch.cat([self.doc, doc], 1)
        self.img = torch.cat([self.img, img], 1)
        self.next_pos = self.next_pos + (doc >= 0).sum(1)
        return out.logits[head]

    def feed_text(self, ids: list[list[int]], pad: int, head: int = TEXT):
        """Text rows, left-padded to one width (``sample._decode`` feeds its tokens here)."""
        tokens, doc = _left_pad(ids, pad)
        tokens, doc = tokens.to(self.device), doc.to(self.device)
        return self.feed(tokens, torch.full_like(tokens, TEXT), head, doc)


def _left_pad(ids: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in ids)
    tokens = torch.full((len(ids), width), pad, dtype=torch.long)
    doc = torch.full_like(tokens, -1)
    for r, x in enumerate(ids):
        if x:
            tokens[r, width - len(x):] = torch.tensor(x)
            doc[r, width - len(x):] = 0
    return tokens, doc


def _uncached_logits(model, prefixes: list[list[int]], codes: torch.Tensor, pad: int) -> torch.Tensor:
    """The reference: prefix + codes so far (rows, k), whole, through the model; image logits at the end."""
    tokens, doc = _left_pad(prefixes, pad)
    tokens, doc = tokens.to(codes.device), doc.to(codes.device)
    modality = torch.cat([torch.full_like(tokens, TEXT), torch.full_like(codes, IMAGE)], 1)
    ctx = TokenContext(model, len(prefixes), codes.device)
    return ctx.feed(torch.cat([tokens, codes], 1), modality, IMAGE, torch.cat([doc, torch.zeros_like(codes)], 1))


def _pick(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, gens: list) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    return torch.cat([pick_token(logits[r:r + 1], temperature, top_k, top_p, g) for r, g in enumerate(gens)])


@torch.no_grad()
def sample_image_tokens(model, ctx_ids: list[list[int]], specials: Specials, grid: tuple[int, int],
                        cfg_scale: float = SampleConfig.cfg_scale, temperature: float = 1.0, top_k: int = 0,
                        top_p: float = 1.0, generators: list | None = None, n_codes: int | None = None,
                        use_cache: bool = True) -> torch.Tensor:
    """Codes (rows, h, w) for rows whose context is ``BOS, ctx_ids[r], BOI``. ``generators[r]`` draws row
    r's codes; ``n_codes`` (the tokenizer's codebook) bars the head's rows above it."""
    rows, guided = len(ctx_ids), cfg_scale != 1.0
    prefixes = [[specials.bos, *x, specials.boi] for x in ctx_ids] + ([[specials.bos, specials.boi]] * rows if guided else [])
    device = next(model.parameters()).device
    gens = generators or [rng.torch_generator(0, r, purpose="image_tokens") for r in range(rows)]
    n = grid[0] * grid[1]
    if use_cache:
        ctx = TokenContext(model, len(prefixes), device)
        logits = ctx.feed_text(prefixes, specials.pad, head=IMAGE)
    else:
        logits = _uncached_logits(model, prefixes, torch.zeros(len(prefixes), 0, dtype=torch.long, device=device),
                                  specials.pad)
    codes = torch.zeros(len(prefixes), 0, dtype=torch.long, device=device)
    for k in range(n):
        logits = logits.float()
        if guided:  # classifier-free guidance on logits (Lumina-mGPT)
            logits = logits[rows:] + cfg_scale * (logits[:rows] - logits[rows:])
        if n_codes is not None and n_codes < logits.shape[-1]:
            logits[:, n_codes:] = float("-inf")
        tok = _pick(logits, temperature, top_k, top_p, gens)  # (rows,)
        tok = torch.cat([tok, tok]) if guided else tok
        codes = torch.cat([codes, tok[:, None]], 1)
        if k == n - 1:
            break
        if use_cache:
            logits = ctx.feed(tok[:, None], torch.full_like(tok[:, None], IMAGE), IMAGE)
        else:
            logits = _uncached_logits(model, prefixes, codes, specials.pad)
    return codes[:rows].reshape(rows, *grid)


@torch.no_grad()
def generate_image_tokens(model, prompt_ids: list[list[int]], specials: Specials,
                          cfg_scale: float = SampleConfig.cfg_scale, temperature: float = 1.0, top_k: int = 0,
                          top_p: float = 1.0, seed: int = SampleConfig.seed, n_per_prompt: int = 1,
                          batch_size: int = 16, n_codes: int | None = None, use_cache: bool = True,
                          first_index: int = 0) -> torch.Tensor:
    """Codes (len(prompts) * n_per_prompt, h, w), prompt-major, on the model's ``latent_size`` grid."""
    if not prompt_ids:
        raise ValueError("no prompts given")
    if batch_size < 1 or not -MAX_SEED <= seed <= MAX_SEED or not cfg_scale >= 0:
        raise ValueError(f"batch_size={batch_size} must be >= 1, seed={seed} a signed 64-bit integer, "
                         f"cfg_scale={cfg_scale} >= 0")
    was_training = model.training
    model.eval()
    side = model.cfg.latent_size
    jobs = [i for i in range(len(prompt_ids)) for _ in range(n_per_prompt)]
    out = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        gens = [rng.torch_generator(seed, first_index + start + k, purpose="image_tokens") for k in range(len(chunk))]
        out.append(sample_image_tokens(model, [prompt_ids[i] for i in chunk], specials, (side, side), cfg_scale,
                                       temperature, top_k, top_p, gens, n_codes, use_cache).cpu())
    model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def caption_image_tokens(model, codes: torch.Tensor, specials: Specials,
                         max_new_tokens: int = SampleConfig.max_new_tokens, temperature: float = SampleConfig.temperature,
                         top_k: int = SampleConfig.top_k, top_p: float = SampleConfig.top_p,
                         seed: int = SampleConfig.seed) -> list[list[int]]:
    """Captions of images given as codes (N, h, w): context ``BOS, BOI, codes, EOI``, then text (ids stop
    before EOS)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows = codes.shape[0]
    ctx = TokenContext(model, rows, device)
    ctx.feed_text([[specials.bos, specials.boi]] * rows, specials.pad, head=IMAGE)
    flat = codes.reshape(rows, -1).to(device)
    tokens = torch.cat([flat, torch.full((rows, 1), specials.eoi, dtype=torch.long, device=device)], 1)
    modality = torch.full_like(tokens, IMAGE)
    modality[:, -1] = TEXT
    logits = ctx.feed(tokens, modality, TEXT)
    gen = rng.torch_generator(seed, purpose="decode")
    ids = _decode(ctx, logits, specials, max_new_tokens, temperature, top_k, top_p, gen,
                  banned=(specials.boi, specials.eoi, specials.pad, specials.bos))
    model.train(was_training)
    return [x[:-1] if x and x[-1] == specials.eos else x for x in ids]
