"""One typed config tree: dataclass defaults < YAML file < dotted CLI overrides (``model.dim=64``).

``load_config`` rejects unknown keys (suggesting the closest valid one) and wrong types, naming the
key; ``validate`` holds every cross-field check, so a bad config stops before any work starts.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad config: the message names the key and the value."""


@dataclass
class ModelConfig:
    size: str = ""  # a named size from model/sizes.py; its values are defaults for the keys below
    # "transfusion": text tokens + continuous latents (LM + flow loss); "chameleon": text + discrete image
    # tokens from a VQ tokenizer (codec.kind=vq), one next-token loss (model/chameleon.py)
    setting: str = "transfusion"
    arch: str = "mot"  # "mot" (per-modality weights) | "dense" | "moe" (MoE-4x feed-forward)
    n_modalities: int = 2  # text, image (, speech ...): MoT has one weight group per modality
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    ffn_dim: int = 0  # 0: Llama's SwiGLU width, 8/3 * dim rounded up to 64
    norm_placement: str = "post"  # "post" as in MoT Algorithm 1 | "pre"
    qk_norm: bool = False
    rope_theta: float = 10000.0
    vocab_size: int = 0  # 0: the tokenizer's vocabulary (with the BOI/EOI/pad specials), rounded up to 64
    latent_channels: int = 0  # 0: the codec's (codec_geometry); set, it must agree with the codec's
    latent_size: int = 0  # latent height = width; 0: data.resolution / the codec's downsampling
    image_vocab_size: int = 0  # chameleon: rows of the image embedding / head; 0: the VQ codebook's size
    patch_size: int = 2
    moe_experts: int = 4  # used when arch == "moe"
    moe_routing: str = "expert_choice"  # "expert_choice" (MoT paper) | "token_choice" (top-1 + aux loss)
    moe_capacity: float = 1.0
    moe_aux_weight: float = 0.01
    init_std: float = 0.02
    attention: str = "auto"  # "auto" (flex on CUDA, SDPA elsewhere) | "sdpa" | "flex"


@dataclass
class FlowConfig:
    loss_weight: float = 5.0  # lambda in L = L_LM + lambda * L_flow (Transfusion)
    t_sampling: str = "uniform"  # "uniform" | "logit_normal" (SD3)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0  # SD3 resolution shift: t' = s t / (1 + (s - 1) t)
    caption_t_max: float = 0.5  # t cap for images that condition text (captioning direction)


@dataclass
class CodecConfig:
    kind: str = "trained"  # "trained" (our small AutoencoderKL) | "diffusers" | "taef2" | "vq" (discrete tokens)
    path: str = ""  # diffusers: hub id or folder; trained, vq: folder ("" = train one into the cache)
    subfolder: str = ""  # the model's folder inside codec.path (a pipeline folder's "vqvae", "vae" ...)
    encoder_path: str = ""  # taef2
    decoder_path: str = ""  # taef2
    scaling_factor: float | None = None  # None: from the VAE's config / measured at training
    shift_factor: float | None = None
    cache_dir: str = "~/.cache/transfusion_mot"  # trained VAEs and cached latents
    vae_steps: int = 600  # training budget of the small VAE
    vae_latent_channels: int = 4
    vae_channels: tuple = (32, 64, 64)
    vae_latent_noise: float = 0.0  # decoder trains on z + this * std(z) * noise: spreads the latent code out
    vae_chroma_weight: float = 0.0  # pixel loss weight 1 + this * chroma: saturated objects vs grey background
    # kind=vq without a path: our small VQModel (data/vq_train.py), chosen on eval/results/vq_tokenizer.md
    vq_steps: int = 600  # training budget of the small VQModel
    vq_codebook_size: int = 1024
    vq_latent_channels: int = 8  # dimensions of a code
    vq_channels: tuple = (32, 64, 64)  # len(vq_channels) blocks: 2 ** (len - 1) downsampling
    vq_chroma_weight: float = 10.0  # as vae_chroma_weight


@dataclass
class DataConfig:
    source: str = "shapes"  # "shapes" | "imagefolder" | "coco" | "webdataset" | "hf" | "latents" (`encode` output)
    path: str = ""  # folder / shard pattern / dataset path (unused for shapes)
    captions: str = ""  # coco json or captions file, where the source needs one
    image_column: str = "image"  # hf datasets
    text_column: str = "text"
    resolution: int = 64
    crop: str = "center"  # "center" | "random"
    tokenizer: str = "bytes"  # "bytes" | a local tokenizer folder / .model file | a hub id
    seq_len: int = 256
    batch_size: int = 8  # rows per micro-batch per process
    max_caption_tokens: int = 96
    caption_first: float = 0.8  # share of caption->image examples (the rest image->caption)
    caption_dropout: float = 0.1  # empty caption, for classifier-free guidance
    shapes_train_size: int = 50000
    shapes_val_size: int = 512
    shapes_max_shapes: int = 4  # shapes per image, 1..4
    shapes_textured: bool = True  # textured as well as plain backgrounds
    num_workers: int = 0
    stream_lanes: int = 64  # shards are read in min(this, shards) lanes; a multiple of processes x workers
    cache_latents: bool = True
    val_path: str = ""  # held-out data for validation loss ("" = hold out val_fraction of the source)
    val_fraction: float = 0.05  # the last records of a real source (no val_path) are held out, never trained on


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1  # matrices only
    warmup_steps: int = 4000
    final_lr: float = 1.5e-5  # cosine decays to this
    clip: float = 1.0


@dataclass
class TrainConfig:
    steps: int = 1000
    grad_accum: int = 1
    seed: int = 0
    out_dir: str = "runs/default"
    ema_decay: float = 0.999  # 0 disables EMA
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    sample_every: int = 0
    save_every: int = 500
    keep_checkpoints: int = 2
    resume: str = ""  # "" | "auto" | a checkpoint folder
    overwrite: bool = False  # a new run in a run dir that holds one deletes that run's files first (--overwrite)
    allow_config_change: bool = False  # resume even if data-order keys changed (--allow-config-change)
    parallel: str = "auto"  # "auto" (fsdp when accelerate launches with an FSDP config) | "ddp" | "fsdp"
    mixed_precision: str = "auto"  # "auto" (accelerate launch's flag; else bf16 on CUDA, fp32 on CPU) | "no" | "bf16" | "fp16"
    compile: bool = False
    activation_checkpointing: bool = False
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    upcycle_from: str = ""  # a dense run dir whose weights initialise every MoT group
    stop_after: int = 0  # end this invocation at this step (saved; resume later); the schedule spans `steps`


# Sampling schedulers whose sigma grid is all that matters: Euler steps on the model's velocity. Other
# diffusers flow-matching schedulers need their own step() (Heun: a second model call per step; LCM:
# re-noising), which sampling does not drive, so they are refused instead of silently run as Euler.
SCHEDULERS = ("euler", "FlowMatchEulerDiscreteScheduler")


@dataclass
class SampleConfig:
    """The one home of the sampling defaults: generation, captioning and the CLI read a run's values."""

    steps: int = 250  # Euler steps from t=1 to t=0 (MoT paper)
    scheduler: str = "euler"  # one of SCHEDULERS ("euler": uniform grid, shifted by flow.shift)
    cfg_scale: float = 4.0
    seed: int = 0
    n_per_prompt: int = 1
    temperature: float = 0.0  # text decoding and captioning; 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    max_new_tokens: int = 64


@dataclass
class EvalConfig:
    n_prompts: int = 64  # held-out prompts for the sample grid and prompt-following
    val_examples: int = 256
    val_t_grid: int = 8  # evenly spaced t values of the diffusion validation loss
    val_seed: int = 1234
    sample_steps: int = 0  # 0: sample.steps
    batch_size: int = 16


@dataclass
class Config:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(_plain(self.to_dict()), sort_keys=False))


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the field type ``tp``; ints are accepted for floats, lists for tuples."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    if tp in (int, float, str, bool, tuple) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _merge(node: Any, updates: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(type(node))
    names = [f.name for f in fields(node)]
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {full!r}{hint}")
        current = getattr(node, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a mapping of its keys, got {value!r}")
            _merge(current, value, f"{full}.")
        else:
            setattr(node, key, _coerce(value, hints[key], full))
    return node


def parse_overrides(overrides: list[str]) -> dict:
    """["model.dim=64", "train.compile=true"] -> nested dict (values parsed as YAML scalars)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. model.dim=64)")
        key, raw = item.split("=", 1)
        node = tree
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        try:
            node[leaf] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML: {_one_line(e)}") from None
    return tree


def _one_line(error: Exception) -> str:
    """A YAML error's problem and position in one line (PyYAML prints them over several)."""
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(error, "problem", None) or str(error)
    return " ".join(f"{problem}{where}".split())


def _deep_update(base: dict, new: dict) -> dict:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, check: bool = True) -> Config:
    """Defaults < YAML < overrides; a named ``model.size`` supplies model defaults under both. The latent
    shape comes from ``data.resolution`` and the codec where the config says enough (``codec_geometry``);
    a size's latent shape is used only where it does not."""
    from .model.sizes import LATENT_KEYS, SIZES

    tree: dict = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}" + (" (a directory)" if path.is_dir() else ""))
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid YAML: {_one_line(e)}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    _deep_update(tree, parse_overrides(overrides or []))
    model = tree.get("model") or {}
    size = model.get("size", "") if isinstance(model, dict) else ""
    fallback: dict = {}
    if size:
        if size not in SIZES:
            close = difflib.get_close_matches(str(size), list(SIZES), n=1)
            raise ConfigError(f"model.size={size!r} is not a named size ({', '.join(SIZES)})"
                              + (f"; did you mean {close[0]!r}?" if close else ""))
        defaults = dict(SIZES[size])
        fallback = {k: defaults.pop(k) for k in LATENT_KEYS if k in defaults}
        tree["model"] = {**defaults, **model}
    cfg = _merge(Config(), tree, "")
    derive_latent_shape(cfg, fallback)
    if check:
        validate(cfg)
    return cfg


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


def derive_latent_shape(cfg: Config, fallback: dict | None = None) -> Config:
    """Fill ``model.latent_channels`` / ``model.latent_size`` left at 0 from the codec and
    ``data.resolution``, else from ``fallback`` (a named size's). ``validate`` checks set values."""
    m, geometry = cfg.model, codec_geometry(cfg.codec)
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


def config_from_dict(tree: dict) -> Config:
    """Rebuild a saved (resolved) config, e.g. from a run directory."""
    return _merge(Config(), tree, "")


def _choice(key: str, value: str, options: tuple) -> None:
    if value not in options:
        close = difflib.get_close_matches(value, options, n=1)
        raise ConfigError(f"{key}={value!r} is not one of {options}" + (f"; did you mean {close[0]!r}?" if close else ""))


def validate(cfg: Config) -> Config:
    """Every cross-field check, in one place. Raises ConfigError naming the keys and values."""
    m, d, f, o, t, s = cfg.model, cfg.data, cfg.flow, cfg.optim, cfg.train, cfg.sample
    _choice("model.arch", m.arch, ("mot", "dense", "moe"))
    _choice("model.setting", m.setting, ("transfusion", "chameleon"))
    _choice("model.norm_placement", m.norm_placement, ("post", "pre"))
    _choice("model.moe_routing", m.moe_routing, ("expert_choice", "token_choice"))
    _choice("model.attention", m.attention, ("auto", "sdpa", "flex"))
    _choice("flow.t_sampling", f.t_sampling, ("uniform", "logit_normal"))
    _choice("codec.kind", cfg.codec.kind, ("trained", "diffusers", "taef2", "vq"))
    _choice("data.source", d.source, ("shapes", "imagefolder", "coco", "webdataset", "hf", "latents"))
    _choice("data.crop", d.crop, ("center", "random"))
    _choice("train.mixed_precision", t.mixed_precision, ("auto", "no", "bf16", "fp16"))
    _choice("train.parallel", t.parallel, ("auto", "ddp", "fsdp"))
    if s.scheduler not in SCHEDULERS:
        raise ConfigError(f"sample.scheduler={s.scheduler!r} is not one of {SCHEDULERS}: sampling takes only a "
                          f"scheduler's sigma grid and integrates with Euler steps, so schedulers that need their "
                          f"own step() (Heun, LCM, DDIM, ...) would run as something else")
    _check_counters(cfg)
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
    if m.n_modalities < 2:
        raise ConfigError(f"model.n_modalities={m.n_modalities}: text and image need at least 2")
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
    if f.shift <= 0 or f.logit_std <= 0:
        raise ConfigError(f"flow.shift={f.shift} and flow.logit_std={f.logit_std} must be > 0")
    if not 0 < f.caption_t_max <= 1:
        raise ConfigError(f"flow.caption_t_max={f.caption_t_max} must lie in (0, 1]")
    for key, value in (("data.caption_first", d.caption_first), ("data.caption_dropout", d.caption_dropout)):
        if not 0 <= value <= 1:
            raise ConfigError(f"{key}={value} must lie in [0, 1]")
    if not 0 <= d.val_fraction < 1:
        raise ConfigError(f"data.val_fraction={d.val_fraction} must lie in [0, 1)")
    n_patches = (m.latent_size // m.patch_size) ** 2
    need = 4 + d.max_caption_tokens + n_patches  # data/batches.py layout(): BOS, caption, BOI, patches, EOI, EOS
    if d.seq_len < need:
        raise ConfigError(f"data.seq_len={d.seq_len} cannot hold one image of {n_patches} patches plus "
                          f"data.max_caption_tokens={d.max_caption_tokens} caption tokens and 4 markers (needs >= "
                          f"{need}); raise data.seq_len or model.patch_size, or lower data.max_caption_tokens")
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


def _check_counters(cfg: Config) -> None:
    """Counts, sizes and periods: each one line, before any work (a log_every of 0 used to divide by zero)."""
    m, d, c, t, s, e = cfg.model, cfg.data, cfg.codec, cfg.train, cfg.sample, cfg.eval
    at_least_one = {"model.dim": m.dim, "model.n_layers": m.n_layers, "model.n_heads": m.n_heads,
                    "data.seq_len": d.seq_len, "data.batch_size": d.batch_size, "data.resolution": d.resolution,
                    "data.max_caption_tokens": d.max_caption_tokens, "data.stream_lanes": d.stream_lanes,
                    "data.shapes_train_size": d.shapes_train_size,
                    "data.shapes_val_size": d.shapes_val_size, "codec.vae_steps": c.vae_steps,
                    "codec.vae_latent_channels": c.vae_latent_channels, "train.steps": t.steps,
                    "train.grad_accum": t.grad_accum, "train.log_every": t.log_every,
                    "train.max_bad_steps": t.max_bad_steps, "sample.steps": s.steps,
                    "sample.n_per_prompt": s.n_per_prompt, "sample.max_new_tokens": s.max_new_tokens,
                    "eval.n_prompts": e.n_prompts, "eval.batch_size": e.batch_size,
                    "eval.val_examples": e.val_examples, "eval.val_t_grid": e.val_t_grid}
    for key, value in at_least_one.items():
        if value < 1:
            raise ConfigError(f"{key}={value} must be >= 1")
    zero_is_off = {"train.eval_every": t.eval_every, "train.sample_every": t.sample_every,
                   "train.save_every": t.save_every, "train.keep_checkpoints": t.keep_checkpoints,
                   "train.stop_after": t.stop_after, "data.num_workers": d.num_workers,
                   "eval.sample_steps": e.sample_steps, "model.ffn_dim": m.ffn_dim}
    for key, value in zero_is_off.items():
        if value < 0:
            raise ConfigError(f"{key}={value} must be >= 0")
    if not 1 <= d.shapes_max_shapes <= 4:
        raise ConfigError(f"data.shapes_max_shapes={d.shapes_max_shapes} must lie in 1..4")
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
            geometry = codec_geometry(cfg.codec)
            if geometry is not None and cfg.data.resolution % geometry[1]:
                _check_codec_geometry(cfg)  # the resolution is what is wrong: say so
            raise ConfigError(f"{key}=0 (from the codec) but the config does not tell the codec's latent shape "
                              f"({_codec_words(cfg.codec)}: not a local folder with a config.json); set "
                              f"model.latent_channels and model.latent_size")


def _check_codec_geometry(cfg: Config) -> None:
    """Set latent values must be what the codec gives at data.resolution (checked again once it is loaded)."""
    geometry = codec_geometry(cfg.codec)
    if geometry is None:
        return
    channels, factor = geometry
    m, res, codec = cfg.model, cfg.data.resolution, _codec_words(cfg.codec)
    if res % factor:
        raise ConfigError(f"data.resolution={res} is not divisible by the codec's downsampling factor {factor} "
                          f"({codec}); use a multiple of {factor}")
    if m.latent_channels != channels:
        raise ConfigError(f"model.latent_channels={m.latent_channels} but the codec gives {channels} ({codec}); "
                          f"leave it at 0 to take the codec's")
    if m.latent_size != res // factor:
        raise ConfigError(f"model.latent_size={m.latent_size} but data.resolution={res} / the codec's factor "
                          f"{factor} = {res // factor} ({codec}); leave it at 0 to derive it")


def _check_setting(cfg: Config) -> None:
    """Chameleon reads discrete image tokens (a VQ tokenizer, one token per code). (Transfusion with
    codec.kind=vq is refused where a run loads its codec: the tokenizer's own tools load such configs.)"""
    m, kind = cfg.model, cfg.codec.kind
    if m.setting != "chameleon":
        return
    if kind != "vq":
        raise ConfigError(f"model.setting=chameleon needs discrete image tokens: codec.kind=vq, not {kind!r}")
    if cfg.data.source == "latents":
        raise ConfigError("data.source=latents: encoded shards hold continuous latents, not the VQ codes "
                          "model.setting=chameleon reads; stream the images (data.source=webdataset) instead")
    if m.patch_size != 1:
        raise ConfigError(f"model.patch_size={m.patch_size}: model.setting=chameleon takes one token per VQ code; "
                          f"set model.patch_size=1")
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


def replace(cfg: Config, **sections: dict) -> Config:
    """A copy with some section fields changed, e.g. replace(cfg, train={"steps": 10})."""
    new = dataclasses.replace(cfg)
    for name, updates in sections.items():
        setattr(new, name, dataclasses.replace(getattr(cfg, name), **updates))
    return new
