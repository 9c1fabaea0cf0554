"""One typed config tree: dataclass defaults < YAML file < dotted CLI overrides (``model.dim=64``).

``load_config`` rejects unknown keys (suggesting the closest valid one) and wrong types, naming the
key; ``config_checks.validate`` holds every cross-field check, so a bad config stops before any work
starts, and ``config_checks.derive_latent_shape`` fills the latent shape from the codec.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad config: the message names the key and the value."""


@dataclass
class BackboneConfig:
    """The MoT backbone's shape (``model/mot.py``): ``model.backbone`` in a config. Its keys may also be
    written flat under ``model`` (``model.dim=64``), the documented shorthand (``file_shorthand``). How many
    weight groups it has and whether its feed-forward is MoE follow from ``model.arch`` and the modalities
    (``ModelConfig.n_groups`` / ``ModelConfig.moe``), so they are not keys here."""

    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    ffn_dim: int = 0  # 0: Llama's SwiGLU width, 8/3 * dim rounded up to 64
    norm_placement: str = "post"  # "post" as in MoT Algorithm 1 | "pre"
    qk_norm: bool = False
    rope_theta: float = 10000.0
    moe_experts: int = 4  # used when model.arch == "moe"
    moe_routing: str = "expert_choice"  # "expert_choice" (MoT paper) | "token_choice" (top-1 + aux loss)
    moe_capacity: float = 1.0  # expert choice: a document of n tokens fills capacity * n expert slots

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden(self) -> int:
        """The SwiGLU width: ``ffn_dim``, or Llama's rule (``model/layers.py`` ffn_hidden_dim)."""
        from .model.layers import ffn_hidden_dim

        return self.ffn_dim or ffn_hidden_dim(self.dim)


BACKBONE_KEYS = tuple(f.name for f in fields(BackboneConfig))


@dataclass
class ModelConfig:
    size: str = ""  # a named size from model/sizes.py; its values are defaults for the keys below
    # "transfusion": text tokens + continuous latents (LM + flow loss); "chameleon": text + discrete image
    # tokens from a VQ tokenizer (codec.kind=vq), one next-token loss (model/chameleon.py)
    setting: str = "transfusion"
    arch: str = "mot"  # "mot" (per-modality weights) | "dense" | "moe" (MoE-4x feed-forward)
    extra_modalities: tuple = ()  # plug-in modalities by registered name (model/adapters.py), ids 2, 3, ...
    backbone: BackboneConfig = field(default_factory=BackboneConfig)  # flat model.dim ... is the shorthand
    vocab_size: int = 0  # 0: the tokenizer's vocabulary (with the BOI/EOI/pad specials), rounded up to 64
    latent_channels: int = 0  # 0: the codec's (codec_geometry); set, it must agree with the codec's
    latent_size: int = 0  # latent height = width; 0: data.resolution / the codec's downsampling
    image_vocab_size: int = 0  # chameleon: rows of the image embedding / head; 0: the VQ codebook's size
    patch_size: int = 2
    # where an image patch is, besides the sequence's 1-D RoPE: "rope1d" (nothing more; Transfusion's linear
    # patches) | "sincos2d" (a fixed sin-cos embedding of the patch's row and column added to its input, as
    # DiT and BAGEL do; no parameters)
    image_pos: str = "rope1d"
    moe_aux_weight: float = 0.01
    init_std: float = 0.02
    attention: str = "auto"  # "auto" (flex on CUDA, SDPA elsewhere) | "sdpa" | "flex"

    # The one place the backbone's layout follows from the architecture and the modalities.
    @property
    def n_modalities(self) -> int:
        """Text, image and the plug-ins: the adapters, and MoT's weight groups."""
        return 2 + len(self.extra_modalities)

    @property
    def n_groups(self) -> int:
        """Weight groups of the backbone: one per modality for MoT, one for dense and MoE."""
        return self.n_modalities if self.arch == "mot" else 1

    @property
    def moe(self) -> bool:
        """Whether the feed-forward is ``backbone.moe_experts`` experts (the MoE-4x baseline)."""
        return self.arch == "moe"


def _backbone_alias(name: str) -> property:
    """``model.<name>`` reads and writes ``model.backbone.<name>`` (one value, two spellings)."""
    return property(lambda self: getattr(self.backbone, name),
                    lambda self, value: setattr(self.backbone, name, value),
                    doc=f"model.backbone.{name} (the flat shorthand)")


for _name in BACKBONE_KEYS:
    setattr(ModelConfig, _name, _backbone_alias(_name))


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
    vae_lr: float = 2e-3  # peak of the small VAE's one-cycle schedule
    # kind=vq without a path: our small VQModel (data/vq_train.py), chosen on eval/results/vq_tokenizer.md
    vq_steps: int = 600  # training budget of the small VQModel
    vq_codebook_size: int = 1024
    vq_latent_channels: int = 8  # dimensions of a code
    vq_channels: tuple = (32, 64, 64)  # len(vq_channels) blocks: 2 ** (len - 1) downsampling
    vq_chroma_weight: float = 10.0  # as vae_chroma_weight


@dataclass
class DataConfig:
    source: str = "shapes"  # a name in data/sources.py SOURCES: shapes, imagefolder, coco, webdataset, hf, latents
    path: str = ""  # folder / shard pattern / dataset path (unused for shapes)
    captions: str = ""  # coco json or captions file, where the source needs one
    image_column: str = "image"  # hf datasets
    text_column: str = "text"
    resolution: int = 64
    crop: str = "center"  # "center" | "random"
    # aspect-ratio buckets: (height, width) pixel sizes, e.g. [[64, 64], [48, 80], [80, 48]]; each image is
    # resized to cover the one nearest its aspect ratio and cropped to it. () = square crops at data.resolution
    buckets: tuple = ()
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
    sample_every: int = 0  # also logged as an image to the tracker
    report_to: str = "tensorboard"  # "tensorboard" (run_dir/tb) | "wandb" (needs `pip install wandb`) | "none"
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
            known = names + list(BACKBONE_KEYS) if isinstance(node, ModelConfig) else names  # the shorthand's too
            close = difflib.get_close_matches(key, known, n=1)
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


def file_shorthand(tree: dict, where: str = "") -> dict:
    """``tree`` with the flat backbone keys under ``model`` (``model.dim``, the shorthand that YAML files,
    CLI overrides and saved runs of older versions use) filed into ``model.backbone``. A key given both ways
    with different values is an error naming it; ``where`` says which file or overrides gave it."""
    model = tree.get("model")
    if not isinstance(model, dict) or not any(k in model for k in BACKBONE_KEYS):
        return tree
    model = dict(model)
    nested = model.get("backbone", {})
    if not isinstance(nested, dict):
        raise ConfigError(f"model.backbone: expected a mapping of its keys, got {nested!r}")
    nested, hints = dict(nested), typing.get_type_hints(BackboneConfig)
    for key in BACKBONE_KEYS:
        if key not in model:
            continue
        value = _coerce(model.pop(key), hints[key], f"model.{key}")  # a type error names the key as written
        if key in nested and nested[key] != value:
            raise ConfigError(f"model.{key}={value!r} and model.backbone.{key}={nested[key]!r} disagree"
                              + (f" in {where}" if where else "") + "; give it once")
        nested[key] = value
    model["backbone"] = nested
    return {**tree, "model": model}


def _drop_group_count(tree: dict) -> dict:
    """Saved runs of older versions (and their configs) carry ``model.n_modalities``; it now follows from
    ``model.extra_modalities`` (``ModelConfig.n_modalities``), so it is accepted only where it agrees."""
    model = tree.get("model")
    if not isinstance(model, dict) or "n_modalities" not in model:
        return tree
    model = dict(model)
    given, extras = model.pop("n_modalities"), model.get("extra_modalities") or ()
    if given != 2 + len(extras):
        raise ConfigError(f"model.n_modalities={given!r} but text, image and model.extra_modalities={list(extras)} "
                          f"make {2 + len(extras)}; the count follows from model.extra_modalities: drop the key")
    return {**tree, "model": model}


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
    tree = file_shorthand(tree, str(path) if path else "")
    _deep_update(tree, file_shorthand(parse_overrides(overrides or []), "the overrides"))
    tree = _drop_group_count(tree)
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
        tree["model"] = _deep_update(file_shorthand({"model": defaults})["model"], model)
    from .config_checks import derive_latent_shape, validate

    cfg = _merge(Config(), tree, "")
    derive_latent_shape(cfg, fallback)
    if check:
        validate(cfg)
    return cfg


def config_from_dict(tree: dict) -> Config:
    """Rebuild a saved (resolved) config, e.g. from a run directory; older runs' flat backbone keys and
    ``model.n_modalities`` are read as ``load_config`` reads them."""
    return _merge(Config(), upgrade_saved(tree), "")


def upgrade_saved(tree: dict) -> dict:
    """A saved config tree in today's layout: the flat backbone keys of older runs filed into
    ``model.backbone``, their ``model.n_modalities`` (now derived) dropped where it agrees."""
    return _drop_group_count(file_shorthand(tree, "the saved config"))


def replace(cfg: Config, **sections: dict) -> Config:
    """A copy with some section fields changed, e.g. replace(cfg, train={"steps": 10})."""
    new = dataclasses.replace(cfg)
    for name, updates in sections.items():
        setattr(new, name, dataclasses.replace(getattr(cfg, name), **updates))
    return new
