"""Train the project's own small ``VQModel`` (the Chameleon setting's image tokenizer) in a CPU minute or two.

Same recipe and plumbing as the small VAE (vae_train.py): random crops, the chroma-weighted L1 + MSE
pixel loss, OneCycle AdamW, an atomic write of ``save_pretrained`` + codec.json, and a cache keyed by
what the tokenizer was trained on, under a lock. VQ-specific: the codebook loss + ``beta`` x the
commitment loss with a straight-through decoder input (VQ-VAE), and two guards against dead codes,
the classic VQ failure: the codebook starts from encoder outputs (diffusers' uniform(+-1/K) start sits
far from them, so one code wins everything), and codes unused for a while are moved onto encoder
outputs of the current batch. The saved model is a plain diffusers VQModel: nothing here is needed
to encode or decode with it.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .vae_train import ImageBatches, _check_batch, _write_atomically, get_or_train, pixel_loss, training_batch
from .vq import ImageTokenizer, code_usage, load_image_tokenizer

EVAL_BATCHES = 4
_EVAL_STEP0 = 10_000_000  # held-out batches are requested at steps the training loop never reaches
USAGE_DECAY = 0.99  # per step: a code's usage is a running count over the last ~100 steps
EMA = 0.99  # codebook decay per step: +4 dB PSNR and a higher ceiling than gradient updates (vq_tokenizer.md)


def build_vq(channels: tuple[int, ...] = (32, 64, 64), latent_channels: int = 8, codebook_size: int = 1024,
             resolution: int = 64):
    """A small VQModel: len(channels) blocks -> 2 ** (len(channels) - 1) downsampling, codes of
    ``latent_channels`` dimensions, no attention (as build_vae)."""
    from diffusers import VQModel

    groups = math.gcd(*channels, 8)
    return VQModel(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels), block_out_channels=tuple(channels),
        layers_per_block=1, latent_channels=latent_channels, num_vq_embeddings=codebook_size,
        norm_num_groups=groups, sample_size=resolution, mid_block_add_attention=False, scaling_factor=1.0)


def quantize(vq, h: torch.Tensor, beta: float, codebook_loss: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(decoder input with straight-through gradients (B, D, h, w), [codebook +] beta x commitment loss,
    ids (B h w,)): the VQModel's own nearest-code choice, with VQ-VAE's losses."""
    _, _, (_, _, ids) = vq.quantize(h)
    z = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])  # (M, D)
    e = vq.quantize.embedding(ids.reshape(-1))  # (M, D), gradients reach the codebook
    loss = beta * F.mse_loss(z, e.detach())
    if codebook_loss:
        loss = loss + F.mse_loss(e, z.detach())
    zq = (z + (e - z).detach()).reshape(h.shape[0], *h.shape[2:], h.shape[1]).permute(0, 3, 1, 2)
    return zq, loss, ids.reshape(-1)


class CodebookKeeper:
    """Keeps a training VQModel's codebook (K, D) in use, and with ``ema`` > 0 updates it as the running
    mean of the encoder outputs each code wins (VQ-VAE's EMA variant) instead of by gradient.

    With ``restart``: the codebook starts from encoder outputs of the first batch, and every 10 steps
    codes whose running usage (~ the last 100 steps) fell below 1 % of an even share are moved onto
    random encoder outputs of the current batch, until the last 10 % of training.
    """

    def __init__(self, codebook: torch.Tensor, restart: bool, ema: float, gen: torch.Generator):
        self.codebook, self.restart, self.ema, self.gen = codebook, restart, ema, gen
        k = codebook.shape[0]
        self.usage = torch.zeros(k)  # running count of tokens per code
        self.ema_count, self.ema_sum = torch.ones(k), codebook.detach().clone().cpu()  # (K,), (K, D)
        self.restarted = 0

    @torch.no_grad()
    def update(self, z: torch.Tensor, ids: torch.Tensor, step: int, steps: int) -> None:
        """After the optimizer step of ``step``: encoder outputs ``z`` (M, D) and the codes ``ids`` (M,) they won."""
        z, ids = z.detach().cpu(), ids.cpu()
        counts = torch.bincount(ids, minlength=len(self.usage)).float()  # (K,)
        self.usage.mul_(USAGE_DECAY).add_(counts)
        if self.ema:
            self.ema_count.mul_(self.ema).add_(counts, alpha=1 - self.ema)
            self.ema_sum.mul_(self.ema).add_(torch.zeros_like(self.ema_sum).index_add_(0, ids, z), alpha=1 - self.ema)
            self.codebook.copy_(self._ema_codebook())
        if self.restart and step % 10 == 9 and step < 0.9 * steps:
            self.restart_codes(self.usage < 0.01 * self.usage.sum() / len(self.usage), z)

    def _ema_codebook(self) -> torch.Tensor:
        n = self.ema_count.sum()
        count = (self.ema_count + 1e-5) / (n + len(self.ema_count) * 1e-5) * n  # Laplace-smoothed (K,)
        return (self.ema_sum / count[:, None]).to(self.codebook)

    @torch.no_grad()
    def restart_codes(self, dead: torch.Tensor, z: torch.Tensor) -> None:
        """Move the ``dead`` codes (bool (K,)) onto random encoder outputs ``z`` (M, D), slightly jittered."""
        n = int(dead.sum())
        if not n:
            return
        z = z.detach().cpu()
        pick = torch.randint(len(z), (n,), generator=self.gen)
        new = z[pick] + 0.01 * z.std() * torch.randn(n, z.shape[1], generator=self.gen)  # (n, D)
        self.codebook[dead.to(self.codebook.device)] = new.to(self.codebook)
        self.ema_count[dead], self.ema_sum[dead] = 1.0, new
        self.restarted += n


def train_vq(images: ImageBatches, out_dir: str | Path, resolution: int, steps: int,
             channels: tuple[int, ...] = (32, 64, 64), latent_channels: int = 8, codebook_size: int = 1024,
             batch_size: int = 16, lr: float = 2e-3, seed: int = 0, name: str = "", train_crop: int | None = 32,
             chroma_weight: float = 0.0, beta: float = 0.25, restart_codes: bool = True,
             ema: float = EMA, eval_images: ImageBatches | None = None) -> Path:
    """Train, measure PSNR and codebook usage on held-out batches, and write ``out_dir`` atomically.

    ``restart_codes``: start the codebook from encoder outputs and move codes whose running usage
    fell below 1 % of an even share onto encoder outputs every 10 steps (until the last 10 %).
    ``ema``: > 0 updates the codebook as a running mean (this decay per step) of the encoder outputs
    each code wins, with the commitment loss only; 0 learns it by gradient (codebook loss).
    ``eval_images``: held-out batches; by default ``images(10_000_000 + i)``.
    """
    out_dir = Path(out_dir).expanduser()
    if steps <= 0:
        raise ValueError(f"vq steps must be positive, got {steps}")
    down = 2 ** (len(channels) - 1)
    if resolution % down or (train_crop and train_crop % down):
        raise ValueError(f"resolution={resolution} and train_crop={train_crop} must be multiples of the "
                         f"tokenizer's downsampling factor {down}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    vq = build_vq(channels, latent_channels, codebook_size, resolution).train()
    codebook = vq.quantize.embedding.weight  # (K, D)
    codebook.requires_grad_(not ema)  # with EMA the codebook follows the encoder, not the gradient
    keeper = CodebookKeeper(codebook.data, restart_codes, ema, gen)
    opt = torch.optim.AdamW([p for p in vq.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.99),
                            weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    from tqdm.auto import tqdm

    for step in tqdm(range(steps), desc=f"vq ({name or 'data'})", dynamic_ncols=True):
        x = training_batch(images, step, resolution, batch_size, train_crop, gen)  # (B, 3, c, c) in [-1, 1]
        h = vq.encode(x).latents  # (B, D, h, w)
        z = h.detach().permute(0, 2, 3, 1).reshape(-1, h.shape[1])  # (M, D)
        if restart_codes and step == 0:
            keeper.restart_codes(torch.ones(codebook_size, dtype=torch.bool), z)
        zq, vq_loss, ids = quantize(vq, h, beta, codebook_loss=not ema)
        recon = vq.decoder(vq.post_quant_conv(zq), zq if vq.config.norm_type == "spatial" else None)
        loss = pixel_loss(recon, x, chroma_weight) + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vq.parameters(), 1.0)
        opt.step()
        sched.step()
        keeper.update(z, ids, step, steps)
    vq.eval()
    held_out = eval_images or (lambda i: images(_EVAL_STEP0 + i))
    stats = measure(ImageTokenizer(vq, name or "vq"),
                    [_check_batch(held_out(i), resolution, -1) for i in range(EVAL_BATCHES)])
    meta = {"name": name, "kind": "vq", **stats, "steps": steps, "resolution": resolution,
            "channels": list(channels), "latent_channels": latent_channels, "codebook_size": codebook_size,
            "batch_size": batch_size, "train_crop": train_crop, "lr": lr, "seed": seed, "beta": beta,
            "chroma_weight": chroma_weight, "restart_codes": restart_codes, "codes_restarted": keeper.restarted, "ema": ema,
            "seconds": round(time.perf_counter() - start, 2)}
    _write_atomically(vq, meta, out_dir)
    return out_dir


@torch.no_grad()
def measure(tokenizer: ImageTokenizer, batches: list[torch.Tensor]) -> dict[str, float]:
    """Mean per-image PSNR (dB) of decode(encode(x)) and the codebook usage of the held-out ids."""
    ids, psnrs = [], []
    for x in batches:
        tokens = tokenizer.encode(x)  # (B, h, w)
        mse = (tokenizer.decode(tokens) - x).pow(2).flatten(1).mean(1).clamp_min(1e-10)  # (B,)
        psnrs.append(-10 * torch.log10(mse))
        ids.append(tokens)
    return {"psnr": torch.cat(psnrs).mean().item(), **code_usage(torch.cat(ids), tokenizer.codebook_size)}


# --------------------------------------------------------------------------------------------------
# For a run: the cache key, training on the run's data, and the tokenizer a config names
# --------------------------------------------------------------------------------------------------
def vq_key(cfg, records) -> str:
    """Cache key of the small VQModel trained for this data: what it was trained on and how."""
    from .records import _records_name

    c = cfg.codec
    spec = json.dumps([_records_name(records), cfg.data.resolution, c.vq_steps, c.vq_codebook_size,
                       c.vq_latent_channels, list(c.vq_channels), c.vq_chroma_weight, cfg.train.seed])
    return "vq-" + hashlib.sha1(spec.encode()).hexdigest()[:12]


def train_tokenizer_for(cfg, out: Path | None = None, records=None) -> Path:
    """Train (or reuse from ``<codec.cache_dir>/vq/<vq_key>``) the small VQModel for ``cfg.data`` (its
    training ``records`` when the caller has them); bad records are skipped as for the VAE. Returns its folder."""
    from .records import _records_name, build_records
    from .run_codec import _cache_root, _vae_images

    records = build_records(cfg.data, "train") if records is None else records
    c = cfg.codec
    kwargs = dict(resolution=cfg.data.resolution, steps=c.vq_steps, channels=tuple(c.vq_channels),
                  latent_channels=c.vq_latent_channels, codebook_size=c.vq_codebook_size, seed=cfg.train.seed,
                  name=_records_name(records), chroma_weight=c.vq_chroma_weight)
    images = _vae_images(records, cfg.data.resolution, seed=cfg.train.seed)
    kwargs["eval_images"] = _vae_images(build_records(cfg.data, "val"), cfg.data.resolution)  # held-out stats
    if out is not None:
        return train_vq(images, Path(out), **kwargs)
    return get_or_train(vq_key(cfg, records), images, _cache_root(cfg), train_vq, "vq", **kwargs)


def image_tokenizer_for(cfg, records=None) -> ImageTokenizer:
    """The run's image tokenizer: the VQModel in ``codec.path`` (+ ``codec.subfolder``), or, without a
    path, the small one trained on ``cfg.data`` (cached)."""
    if cfg.codec.kind != "vq":
        raise ValueError(f"codec.kind={cfg.codec.kind!r}: an image tokenizer needs codec.kind=vq")
    if cfg.codec.path:
        return load_image_tokenizer(cfg.codec)
    folder = train_tokenizer_for(cfg, records=records)
    return load_image_tokenizer(replace(cfg.codec, path=str(folder), subfolder=""))


def run_tokenizer(cfg, run_dir: Path, accelerator=None, records=None) -> ImageTokenizer:
    """The tokenizer of a Chameleon run. A small one trained on the run's data is copied into
    ``run_dir/vq`` (the run stays self-contained, as with ``run_dir/vae``) and read from there on resume;
    one in ``codec.path`` is read where it is. Its grid and codebook must be what the model expects."""
    import contextlib
    import os
    import shutil

    local = Path(run_dir) / "vq"
    main = accelerator is None or accelerator.is_main_process
    if cfg.codec.path:
        tokenizer = load_image_tokenizer(cfg.codec)
    else:
        if (local / "config.json").is_file():
            check_run_tokenizer(local, cfg, records)  # one left by another config is refused, before any work
        else:
            ctx = accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext()
            with ctx:
                src = train_tokenizer_for(cfg, records=records)
            if main and not (local / "config.json").is_file():
                tmp = Path(run_dir) / "vq.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(src, tmp)
                os.replace(tmp, local)
            if accelerator is not None:
                accelerator.wait_for_everyone()
        tokenizer = ImageTokenizer.from_pretrained(local)
    check_tokenizer(tokenizer, cfg)
    return tokenizer


def check_run_tokenizer(local: Path, cfg, records) -> None:
    """``run_dir/vq`` is reused only if trained on this data with this config's knobs (``vq_key``'s fields)."""
    from .codec import CODEC_JSON
    from .records import _records_name

    have = json.loads((local / CODEC_JSON).read_text())
    c = cfg.codec
    want = {"name": ("the data", _records_name(records)), "resolution": ("data.resolution", cfg.data.resolution),
            "steps": ("codec.vq_steps", c.vq_steps), "codebook_size": ("codec.vq_codebook_size", c.vq_codebook_size),
            "latent_channels": ("codec.vq_latent_channels", c.vq_latent_channels),
            "channels": ("codec.vq_channels", list(c.vq_channels)),
            "chroma_weight": ("codec.vq_chroma_weight", c.vq_chroma_weight), "seed": ("train.seed", cfg.train.seed)}
    differ = [f"{key}: the tokenizer has {have.get(field)!r}, the config asks for {value!r}"
              for field, (key, value) in want.items() if have.get(field) != value]
    if differ:
        raise ValueError(f"{local} holds a VQ tokenizer trained for other data or settings ({'; '.join(differ)}); "
                         "a run dir keeps the tokenizer it was started with: use a new train.out_dir")


def check_tokenizer(tokenizer: ImageTokenizer, cfg) -> None:
    """The model's token grid (model.latent_size) and image vocabulary must fit the tokenizer's."""
    m, res = cfg.model, cfg.data.resolution
    if res // tokenizer.downsample != m.latent_size or tokenizer.codebook_size > m.image_vocab_size:
        raise ValueError(f"the image tokenizer {tokenizer.name} gives {res // tokenizer.downsample}x"
                         f"{res // tokenizer.downsample} ids of {tokenizer.codebook_size} codes at data.resolution="
                         f"{res}, but the model expects model.latent_size={m.latent_size} and at most "
                         f"model.image_vocab_size={m.image_vocab_size} codes")


def load_run_tokenizer(cfg, run_dir: Path) -> ImageTokenizer:
    """The tokenizer a finished Chameleon run used (its own ``vq/`` copy when it trained one)."""
    local = Path(run_dir) / "vq"
    if not cfg.codec.path and (local / "config.json").is_file():
        return ImageTokenizer.from_pretrained(local)
    return image_tokenizer_for(cfg)
