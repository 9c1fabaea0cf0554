"""Every cross-field check of a config (``validate``), and the latent shape the codec gives
(``codec_geometry`` / ``derive_latent_shape``): one place, so a bad config stops with one ConfigError
naming the keys and values before any work starts. ``config.load_config`` calls both."""
from __future__ import annotations

import difflib
import json
import math
from pathlib import Path

from .config import SCHEDULERS, CodecConfig, Config, ConfigError


def codec_geometry(codec: CodecConfig) -> tuple[int, int] | None:
    """(latent channels, downsampling factor) of the configured codec, when the config alone tells
    (no weights loaded): a trained VAE or VQ tokenizer from its shape knobs (or its folder's config.json),
    TAEF2's fixed 32 x /8, a local diffusers folder's config.json. None for a hub id or a folder that is not there."""
    if codec.kind == "taef2":
        from .data.taef2 import DOWNSAMPLE, LATENT_CHANNELS

        return LATENT_CHANNELS, DOWNSAMPLE
    if not codec.path:  # trained / vq: one will be trained with these knobs; diffusers: nothing to read
        if codec.kind == "vq":
            return codec.vq_latent_channels, 2 ** (len(codec.vq_channels) - 1)
        return (codec.vae_latent_channels, 2 ** (len(codec.vae_channels) - 1)) if codec.kind == "trained" else None
    folder = Path(codec.path).expanduser() / (codec.subfolder if codec.kind in ("diffusers", "vq") else "")
    config = folder / "config.json"
    if not config.is_file():
        return None
    try:
        vae = json.loads(config.read_text())
        return int(vae["latent_channels"]), 2 ** (len(vae["block_out_channels"]) - 1)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{config}: not an AutoencoderKL / VQModel config (latent_channels, block_out_channels): "
                          f"{e}") from None


def run_geometry(cfg: Config) -> tuple[tuple[int, int] | None, str]:
    """(latent channels, downsampling factor) of the latents this run trains on, and words naming their
    maker: an encoded source's ``encode.json`` (its codec made the latents, whatever ``codec.*`` says at its
    defaults), else the configured codec (``codec_geometry``)."""
    from .data.sources import SOURCES

    spec = SOURCES.get(cfg.data.source)
    if spec is not None and spec.encoded and cfg.data.path:
        meta = Path(cfg.data.path).expanduser() / "encode.json"
        try:
            encoded = json.loads(meta.read_text())
            channels, h, _ = encoded["latent_shape"]
            return (int(channels), int(encoded["resolution"]) // int(h)), f"the latents in {meta}"
        except (OSError, ValueError, KeyError, TypeError):
            return None, f"the latents in {meta}"  # a missing / bad encode.json is named when the data is read
    return codec_geometry(cfg.codec), _codec_words(cfg.codec)


def derive_latent_shape(cfg: Config, fallback: dict | None = None) -> Config:
    """Fill ``model.latent_channels`` / ``model.latent_size`` left at 0 from the codec and
    ``data.resolution``, else from ``fallback`` (a named size's). ``validate`` checks set values."""
    m, (geometry, _) = cfg.model, run_geometry(cfg)
    if geometry is not None:
        channels, factor = geometry
        m.latent_channels = m.latent_channels or channels
        if not m.latent_size and cfg.data.resolution > 0 and cfg.data.resolution % factor == 0:
            m.latent_size = cfg.data.resolution // factor
    for key, value in (fallback or {}).items():
        if not getattr(m, key):
            setattr(m, key, value)
    if m.setting == "chameleon" and not m.image_vocab_size and cfg.codec.kind == "vq":
        m.image_vocab_size = _codebook_size(cfg.codec)
    return cfg


def _codebook_size(codec: CodecConfig) -> int:
    """The VQ tokenizer's codebook size: its folder's config.json, or the small one's knob (0: unknown)."""
    if not codec.path:
        return codec.vq_codebook_size
    config = Path(codec.path).expanduser() / codec.subfolder / "config.json"
    try:
        return int(json.loads(config.read_text())["num_vq_embeddings"]) if config.is_file() else 0
    except (ValueError, KeyError, TypeError):
        return 0


def _choice(key: str, value: str, options: tuple) -> None:
    if value not in options:
        close = difflib.get_close_matches(value, options, n=1)
        raise ConfigError(f"{key}={value!r} is not one of {options}" + (f"; did you mean {close[0]!r}?" if close else ""))


def validate(cfg: Config) -> Config:
    """Every cross-field check, in one place. Raises ConfigError naming the keys and values."""
    from .data.sources import SOURCES

    m, d, f, o, t, s = cfg.model, cfg.data, cfg.flow, cfg.optim, cfg.train, cfg.sample
    _choice("model.arch", m.arch, ("mot", "dense", "moe"))
    _choice("model.setting", m.setting, ("transfusion", "chameleon"))
    _choice("model.norm_placement", m.norm_placement, ("post", "pre"))
    _choice("model.moe_routing", m.moe_routing, ("expert_choice", "token_choice"))
    _choice("model.attention", m.attention, ("auto", "sdpa", "flex"))
    _choice("model.image_pos", m.image_pos, ("rope1d", "sincos2d"))
    if m.image_pos == "sincos2d" and m.dim % 4:
        raise ConfigError(f"model.image_pos=sincos2d splits model.dim={m.dim} into row and column sin-cos "
                          f"quarters: use a model.dim divisible by 4")
    _choice("flow.t_sampling", f.t_sampling, ("uniform", "logit_normal"))
    _choice("codec.kind", cfg.codec.kind, ("trained", "diffusers", "taef2", "vq"))
    _choice("data.source", d.source, tuple(SOURCES))  # the registry (data/sources.py)
    _choice("data.crop", d.crop, ("center", "random"))
    _choice("train.mixed_precision", t.mixed_precision, ("auto", "no", "bf16", "fp16"))
    _choice("train.parallel", t.parallel, ("auto", "ddp", "fsdp"))
    _choice("train.report_to", t.report_to, ("tensorboard", "wandb", "none"))
    if s.scheduler not in SCHEDULERS:
        raise ConfigError(f"sample.scheduler={s.scheduler!r} is not one of {SCHEDULERS}: sampling takes only a "
                          f"scheduler's sigma grid and integrates with Euler steps, so schedulers that need their "
                          f"own step() (Heun, LCM, DDIM, ...) would run as something else")
    _check_counters(cfg)
    if SOURCES[d.source].check is not None:  # the source's own options
        SOURCES[d.source].check(d)
    _validate_vq(cfg.codec, d.resolution)  # before the latent shape is derived from its knobs
    _check_setting(cfg)
    _check_latent_shape(cfg)
    if m.dim % m.n_heads:
        raise ConfigError(f"model.dim={m.dim} is not divisible by model.n_heads={m.n_heads}")
    if (m.dim // m.n_heads) % 2:
        raise ConfigError(f"model.dim / model.n_heads = {m.dim // m.n_heads} must be even (rotary embedding)")
    if m.patch_size not in (1, 2, 4):
        raise ConfigError(f"model.patch_size={m.patch_size} must be 1, 2 or 4")
    if m.latent_size % m.patch_size:
        raise ConfigError(f"model.patch_size={m.patch_size} does not divide model.latent_size={m.latent_size}")
    _check_codec_geometry(cfg)
    _check_buckets(cfg)
    if m.extra_modalities and m.setting != "transfusion":
        raise ConfigError(f"model.extra_modalities={list(m.extra_modalities)} needs model.setting=transfusion")
    if m.arch == "moe" and m.moe_experts < 2:
        raise ConfigError(f"model.moe_experts={m.moe_experts} must be >= 2 for model.arch='moe'")
    if m.arch == "moe" and not 0 < m.moe_capacity <= m.moe_experts:
        raise ConfigError(f"model.moe_capacity={m.moe_capacity} must lie in (0, model.moe_experts={m.moe_experts}]")
    if f.loss_weight < 0:
        raise ConfigError(f"flow.loss_weight={f.loss_weight} must be >= 0 (lambda weighs the flow loss)")
    for key, value in (("codec.vae_latent_noise", cfg.codec.vae_latent_noise),
                       ("codec.vae_chroma_weight", cfg.codec.vae_chroma_weight)):
        if value < 0:
            raise ConfigError(f"{key}={value} must be >= 0")
    if cfg.codec.vae_lr <= 0:
        raise ConfigError(f"codec.vae_lr={cfg.codec.vae_lr} must be > 0")
    if f.shift <= 0 or f.logit_std <= 0:
        raise ConfigError(f"flow.shift={f.shift} and flow.logit_std={f.logit_std} must be > 0")
    if not 0 < f.caption_t_max <= 1:
        raise ConfigError(f"flow.caption_t_max={f.caption_t_max} must lie in (0, 1]")
    for key, value in (("data.caption_first", d.caption_first), ("data.caption_dropout", d.caption_dropout)):
        if not 0 <= value <= 1:
            raise ConfigError(f"{key}={value} must lie in [0, 1]")
    if not 0 <= d.val_fraction < 1:
        raise ConfigError(f"data.val_fraction={d.val_fraction} must lie in [0, 1)")
    _check_seq_len(cfg)
    if o.lr <= 0 or o.final_lr < 0 or o.final_lr > o.lr:
        raise ConfigError(f"optim.lr={o.lr} must be > 0 and optim.final_lr={o.final_lr} in [0, lr]")
    if o.warmup_steps < 0 or o.clip < 0 or o.weight_decay < 0:
        raise ConfigError("optim.warmup_steps, optim.clip and optim.weight_decay must be >= 0")
    if not 0 <= t.ema_decay < 1:
        raise ConfigError(f"train.ema_decay={t.ema_decay} must lie in [0, 1)")
    if not 0 <= t.seed < 2 ** 32:
        raise ConfigError(f"train.seed={t.seed} must lie in [0, 2**32) (numpy and torch seed with it)")
    if not (math.isfinite(s.cfg_scale) and s.cfg_scale >= 0):
        raise ConfigError(f"sample.cfg_scale={s.cfg_scale} must be a finite number >= 0")
    if not (math.isfinite(s.temperature) and s.temperature >= 0) or not 0 < s.top_p <= 1 or s.top_k < 0:
        raise ConfigError(f"sample.temperature={s.temperature} >= 0, sample.top_p={s.top_p} in (0, 1], "
                          f"sample.top_k={s.top_k} >= 0 required")
    return cfg


def _at_least(least: int, values: dict) -> None:
    for key, value in values.items():
        if value < least:
            raise ConfigError(f"{key}={value} must be >= {least}")


def _check_counters(cfg: Config) -> None:
    """Counts, sizes and periods: each one line, before any work (a log_every of 0 used to divide by zero)."""
    m, d, c, t, s, e = cfg.model, cfg.data, cfg.codec, cfg.train, cfg.sample, cfg.eval
    at_least_one = {"model.dim": m.dim, "model.n_layers": m.n_layers, "model.n_heads": m.n_heads,
                    "data.seq_len": d.seq_len, "data.batch_size": d.batch_size, "data.resolution": d.resolution,
                    "data.max_caption_tokens": d.max_caption_tokens, "data.stream_lanes": d.stream_lanes,
                    "codec.vae_steps": c.vae_steps,
                    "codec.vae_latent_channels": c.vae_latent_channels, "train.steps": t.steps,
                    "train.grad_accum": t.grad_accum, "train.log_every": t.log_every,
                    "train.max_bad_steps": t.max_bad_steps, "sample.steps": s.steps,
                    "sample.n_per_prompt": s.n_per_prompt, "sample.max_new_tokens": s.max_new_tokens,
                    "eval.n_prompts": e.n_prompts, "eval.batch_size": e.batch_size,
                    "eval.val_examples": e.val_examples, "eval.val_t_grid": e.val_t_grid}
    _at_least(1, at_least_one)
    zero_is_off = {"train.eval_every": t.eval_every, "train.sample_every": t.sample_every,
                   "train.save_every": t.save_every, "train.keep_checkpoints": t.keep_checkpoints,
                   "train.stop_after": t.stop_after, "data.num_workers": d.num_workers,
                   "eval.sample_steps": e.sample_steps, "model.ffn_dim": m.ffn_dim}
    _at_least(0, zero_is_off)
    if not c.vae_channels or min(c.vae_channels) < 1:
        raise ConfigError(f"codec.vae_channels={list(c.vae_channels)} must list one or more widths >= 1")


def _codec_words(codec: CodecConfig) -> str:
    where = f"codec.path={codec.path!r}" + (f", codec.subfolder={codec.subfolder!r}" if codec.subfolder else "")
    return f"codec.kind={codec.kind}" + (f", {where}" if codec.path else "")


def _check_latent_shape(cfg: Config) -> None:
    """A latent shape left at 0 that the codec could not supply (``derive_latent_shape``)."""
    m = cfg.model
    for key, value in (("model.latent_channels", m.latent_channels), ("model.latent_size", m.latent_size)):
        if value < 0:
            raise ConfigError(f"{key}={value} must be >= 1 (or 0: from the codec)")
        if value == 0:
            geometry, words = run_geometry(cfg)
            if geometry is not None and cfg.data.resolution % geometry[1]:
                _check_codec_geometry(cfg)  # the resolution is what is wrong: say so
            raise ConfigError(f"{key}=0 (from the codec) but the config does not tell the codec's latent shape "
                              f"({words}: not a local folder with a config.json); set "
                              f"model.latent_channels and model.latent_size")


def _check_codec_geometry(cfg: Config) -> None:
    """Set latent values must be what the codec gives at data.resolution (checked again once it is loaded)."""
    geometry, codec = run_geometry(cfg)
    if geometry is None:
        return
    channels, factor = geometry
    m, res = cfg.model, cfg.data.resolution
    if res % factor:
        raise ConfigError(f"data.resolution={res} is not divisible by the codec's downsampling factor {factor} "
                          f"({codec}); use a multiple of {factor}")
    if m.latent_channels != channels:
        raise ConfigError(f"model.latent_channels={m.latent_channels} but the codec gives {channels} ({codec}); "
                          f"leave it at 0 to take the codec's")
    if m.latent_size != res // factor:
        raise ConfigError(f"model.latent_size={m.latent_size} but data.resolution={res} / the codec's factor "
                          f"{factor} = {res // factor} ({codec}); leave it at 0 to derive it")


def _check_seq_len(cfg: Config) -> None:
    """One row must hold the longest document (``longest_document``)."""
    d = cfg.data
    need, n_patches, n_extra = longest_document(cfg)
    if d.seq_len < need:
        largest = " (the largest of data.buckets)" if d.buckets else ""
        extra = f", {n_extra} plug-in positions of data.source={d.source}" if n_extra else ""
        raise ConfigError(f"data.seq_len={d.seq_len} cannot hold one image of {n_patches} patches{largest} plus "
                          f"data.max_caption_tokens={d.max_caption_tokens} caption tokens{extra} and 4 markers (needs "
                          f">= {need}); raise data.seq_len or model.patch_size, or lower data.max_caption_tokens")


def longest_document(cfg: Config) -> tuple[int, int, int]:
    """(positions, image patches, plug-in positions) of the longest training document: BOS, caption, BOI,
    patches, EOI, EOS and the source's plug-in spans (``SourceSpec.extra_positions``). The image is the
    square at data.resolution, or with ``data.buckets`` the largest bucket. data/batches.py layout() packs by it."""
    from .data.sources import source_spec
    from .data.transform import bucket_sizes

    d = cfg.data
    n_patches = (cfg.model.latent_size // cfg.model.patch_size) ** 2
    if d.buckets and cfg.model.latent_size >= 1:
        unit = _patch_pixels(cfg)
        n_patches = max((h // unit) * (w // unit) for h, w in bucket_sizes(d.buckets))
    n_extra = source_spec(d.source).extra_positions  # a user source's plug-in spans
    return 4 + d.max_caption_tokens + n_patches + n_extra, n_patches, n_extra


def _patch_pixels(cfg: Config) -> int:
    """Pixels per patch side: the codec's downsampling (data.resolution / model.latent_size) x model.patch_size."""
    return cfg.data.resolution // cfg.model.latent_size * cfg.model.patch_size


def _check_buckets(cfg: Config) -> None:
    """Each bucket splits into whole patches of whole latent pixels (checked again once the codec is loaded)."""
    from .data.transform import bucket_sizes, check_bucket_patches

    m, d = cfg.model, cfg.data
    buckets = bucket_sizes(d.buckets)
    if not buckets:
        return
    if m.setting != "transfusion":
        raise ConfigError(f"data.buckets={[list(b) for b in buckets]} needs model.setting=transfusion (continuous "
                          f"latents of any shape); model.setting={m.setting} reads square token grids")
    check_bucket_patches(buckets, d.resolution // m.latent_size, m.patch_size)


def _check_setting(cfg: Config) -> None:
    """Chameleon reads discrete image tokens (a VQ tokenizer, one token per code). (Transfusion with
    codec.kind=vq is refused where a run loads its codec: the tokenizer's own tools load such configs.)"""
    m, kind = cfg.model, cfg.codec.kind
    if m.setting != "chameleon":
        return
    if kind != "vq":
        raise ConfigError(f"model.setting=chameleon needs discrete image tokens: codec.kind=vq, not {kind!r}")
    from .data.sources import SOURCES

    if SOURCES[cfg.data.source].encoded:
        raise ConfigError(f"data.source={cfg.data.source}: encoded shards hold continuous latents, not the VQ codes "
                          "model.setting=chameleon reads; stream the images (data.source=webdataset) instead")
    if m.patch_size != 1:
        raise ConfigError(f"model.patch_size={m.patch_size}: model.setting=chameleon takes one token per VQ code; "
                          f"set model.patch_size=1")
    if m.image_pos != "rope1d":
        raise ConfigError(f"model.image_pos={m.image_pos}: model.setting=chameleon embeds image codes like text "
                          f"tokens (1-D RoPE only); the 2-D patch position is for continuous patches")
    if m.image_vocab_size < 1:
        raise ConfigError(f"model.image_vocab_size={m.image_vocab_size}: the VQ codebook size is not known from the "
                          f"config ({_codec_words(cfg.codec)}); set model.image_vocab_size")


def _validate_vq(c: CodecConfig, resolution: int) -> None:
    """The small VQModel's knobs (checked whatever the kind, as the VAE's are), and kind=vq's needs."""
    if c.vq_steps < 1 or c.vq_latent_channels < 1:
        raise ConfigError(f"codec.vq_steps={c.vq_steps} and codec.vq_latent_channels={c.vq_latent_channels} "
                          f"must be >= 1")
    if not 2 <= c.vq_codebook_size <= 2 ** 20:
        raise ConfigError(f"codec.vq_codebook_size={c.vq_codebook_size} must lie in [2, 2**20]")
    if not c.vq_channels or not all(isinstance(ch, int) and not isinstance(ch, bool) and ch >= 1
                                    for ch in c.vq_channels):
        raise ConfigError(f"codec.vq_channels={list(c.vq_channels)} must be a non-empty list of positive "
                          f"ints (one per block; 2 ** (blocks - 1) downsampling)")
    if c.vq_chroma_weight < 0:
        raise ConfigError(f"codec.vq_chroma_weight={c.vq_chroma_weight} must be >= 0")
    down = 2 ** (len(c.vq_channels) - 1)
    if c.kind == "vq" and not c.path and resolution % down:
        raise ConfigError(f"data.resolution={resolution} is not a multiple of the VQ tokenizer's downsampling "
                          f"{down} (codec.vq_channels has {len(c.vq_channels)} blocks)")
    if c.subfolder and (not c.path or Path(c.subfolder).is_absolute() or ".." in Path(c.subfolder).parts):
        raise ConfigError(f"codec.subfolder={c.subfolder!r} must be a relative folder inside codec.path "
                          f"(codec.path={c.path!r})")
