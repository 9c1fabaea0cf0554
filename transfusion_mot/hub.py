"""A trained model as one self-contained folder, laid out the way the Hugging Face hub expects.

::

    model.safetensors   the transformer's weights            config.json   the run's resolved config
    tokenizer/          the tokenizer's own files (none for the built-ins ``bytes`` and ``shapes-words``)
    vae/                the codec: a trained VAE's folder (AutoencoderKL + codec.json), or a diffusers
                        AutoencoderKL saved with ``save_pretrained``;  taef2/: the two TAEF2 weight files;
                        vq/: the VQModel of a Chameleon-setting model (its image tokenizer)
    README.md           the model card (config, data, steps, metrics, samples.png); results.json, samples.png

Copied anywhere (or pushed to the hub and fetched by id), the folder alone generates and captions:
``from_pretrained`` points the config's tokenizer and codec at the folder's own copies (``localize``).

Why huggingface_hub's conventions and not diffusers' ``ModelMixin``/``ConfigMixin``/``DiffusionPipeline``:
those want every component to be a diffusers or transformers class whose constructor arguments are the
config (``model_index.json`` naming each class). Ours is one typed config tree (config.py) shared by a
transformer, a tokenizer wrapper and a codec wrapper; restating it as flat constructor kwargs would give
the project a second config to keep in step. The hub's own conventions need none of that: a folder with
``config.json``, ``*.safetensors`` and a ``README.md`` card, fetched with ``snapshot_download`` (cached,
revisions, offline mode) and published with ``HfApi.create_repo`` + ``upload_folder``.
"""
from __future__ import annotations

import json
import math
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

from .config import Config

BUILTIN_TOKENIZERS = ("bytes", "shapes-words")
TAEF2_FILES = ("taef2_encoder.pth", "taef2_decoder.pth")


class HubError(RuntimeError):
    """The hub could not be reached or refused: the message names the repository and why."""


# --------------------------------------------------------------------------------------------------
# Writing the folder
# --------------------------------------------------------------------------------------------------
def add_parts(folder: Path, cfg: Config, tokenizer=None, codec=None, run_dir: Path | None = None,
              source: Path | None = None) -> None:
    """Tokenizer, codec and model card into ``folder`` (which already holds weights and config).
    ``run_dir``: the training run (its ``vae/``, results.json, samples_final.png); ``source``: the model
    folder the pipeline was loaded from (its results.json and samples.png are carried over)."""
    folder = Path(folder)
    save_tokenizer(cfg.data.tokenizer, folder / "tokenizer", tokenizer)
    save_codec(cfg, folder, codec, run_dir)
    add_results(folder, cfg, run_dir, source)


def add_results(folder: Path, cfg: Config, run_dir: Path | None = None, source: Path | None = None) -> None:
    """The run's results.json and sample grid (or those of the folder a pipeline came from) into the folder,
    and the model card written from them: training calls it again after its final evaluation."""
    folder = Path(folder)
    for src, name in ((source, "results.json"), (source, "samples.png"), (run_dir, "results.json"),
                      (run_dir, "samples_final.png")):
        if src is not None and (Path(src) / name).is_file() and Path(src).resolve() != folder.resolve():
            shutil.copyfile(Path(src) / name, folder / ("samples.png" if name.endswith(".png") else name))
    write_model_card(folder, cfg)


def save_tokenizer(spec: str, out: Path, tokenizer=None) -> None:
    """The built-ins need only their name (in config.json); a local folder or ``.model`` file is copied as
    it is; a hub id is written with the tokenizer's own ``save_pretrained``."""
    if spec in BUILTIN_TOKENIZERS:
        return
    path = Path(spec).expanduser()
    if path.is_dir():
        shutil.copytree(path, out, dirs_exist_ok=True)
    elif path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out / "tokenizer.model")
    else:
        if tokenizer is None:
            from .data.tokenizer import build_tokenizer

            tokenizer = build_tokenizer(spec)
        if getattr(tokenizer, "_hf", None) is None:
            raise ValueError(f"data.tokenizer={spec!r}: cannot write its files (neither a local path nor a "
                             f"transformers tokenizer)")
        tokenizer._hf.save_pretrained(out)


def save_codec(cfg: Config, folder: Path, codec=None, run_dir: Path | None = None) -> None:
    """``vae/`` (trained: the run's copy with its codec.json; diffusers: ``save_pretrained``) or ``taef2/``."""
    c = cfg.codec
    if c.kind == "trained":
        local = Path(run_dir) / "vae" if run_dir is not None else None
        src = local if local is not None and (local / "codec.json").is_file() else Path(c.path).expanduser()
        if not (c.path or src == local) or not (src / "codec.json").is_file():
            raise FileNotFoundError(f"the run's trained VAE was not found ({local or c.path or 'no codec.path'}: "
                                    f"no codec.json); give the run directory that holds vae/")
        shutil.copytree(src, folder / "vae", dirs_exist_ok=True)
    elif c.kind == "diffusers":
        if codec is None:
            from .data.codec import load_codec

            codec = load_codec(c)
        codec.backend.vae.save_pretrained(folder / "vae")
    elif c.kind == "taef2":
        base = Path(c.path).expanduser() if c.path else None
        given = (c.encoder_path or (base / TAEF2_FILES[0] if base else ""),
                 c.decoder_path or (base / TAEF2_FILES[1] if base else ""))
        (folder / "taef2").mkdir(parents=True, exist_ok=True)
        for src, name in zip(given, TAEF2_FILES):
            if not src or not Path(src).is_file():
                raise FileNotFoundError(f"TAEF2 weights {src or name} not found: codec.encoder_path / decoder_path")
            shutil.copyfile(src, folder / "taef2" / name)
    elif c.kind == "vq":  # discrete image tokens: the run's own vq/ (trained on its data) or codec.path's VQModel
        local = Path(run_dir) / "vq" if run_dir is not None else None
        src = local if not c.path and local is not None else Path(c.path).expanduser() / c.subfolder if c.path else None
        if src is not None and (src / "config.json").is_file():
            shutil.copytree(src, folder / "vq", dirs_exist_ok=True)
        elif codec is not None and hasattr(codec, "backend"):  # a loaded pipeline: its VQModel as it is
            codec.backend.vq.save_pretrained(folder / "vq")
        else:
            raise FileNotFoundError(f"the run's VQ image tokenizer was not found ({src or 'no codec.path'}: "
                                    f"no config.json); give the run directory that holds vq/")
    else:
        warnings.warn(f"codec.kind={c.kind!r}: the model folder does not carry this codec; it loads from "
                      f"codec.path={c.path!r}", stacklevel=2)


def localize(cfg: Config, folder: Path) -> Config:
    """The config with its tokenizer and codec pointed at the folder's own copies (where the folder has them)."""
    folder = Path(folder).resolve()
    if (folder / "tokenizer").is_dir():
        cfg.data.tokenizer = str(folder / "tokenizer")
    if (folder / "vae").is_dir() and cfg.codec.kind in ("trained", "diffusers"):
        cfg.codec = replace(cfg.codec, path=str(folder / "vae"), subfolder="")
    elif (folder / "vq").is_dir() and cfg.codec.kind == "vq":
        cfg.codec = replace(cfg.codec, path=str(folder / "vq"), subfolder="")
    elif (folder / "taef2").is_dir() and cfg.codec.kind == "taef2":
        cfg.codec = replace(cfg.codec, path=str(folder / "taef2"), encoder_path="", decoder_path="")
    return cfg


def is_self_contained(folder: Path) -> bool:
    """Whether the folder carries its codec (older exports found it beside themselves, in ``run/vae``)."""
    return any((folder / name).is_dir() for name in ("vae", "taef2", "vq"))


# --------------------------------------------------------------------------------------------------
# The model card
# --------------------------------------------------------------------------------------------------
def write_model_card(folder: Path, cfg: Config) -> Path:
    """``README.md``: hub metadata, how to use it, the config summary, data, training, metrics
    (``results.json`` when present) and the sample grid (``samples.png`` when present)."""
    folder = Path(folder)
    m, d, c, t, o = cfg.model, cfg.data, cfg.codec, cfg.train, cfg.optim
    weights = folder / "model.safetensors"
    codec = c.kind + (f" ({Path(c.path).name})" if c.kind == "diffusers" and c.path else "")
    tokenizer = d.tokenizer if d.tokenizer in BUILTIN_TOKENIZERS else Path(d.tokenizer).name
    model_rows = [
        ("architecture", f"{m.arch}, {m.n_layers} layers, dim {m.dim}, {m.n_heads} heads, norm {m.norm_placement}"),
        ("parameters", f"{_param_count(weights) / 1e6:.2f}M" if weights.is_file() else "?"),
        ("image", f"{d.resolution} px, latents {m.latent_channels}x{m.latent_size}x{m.latent_size}, "
                  f"patch {m.patch_size}"),
        ("tokenizer", tokenizer),
        ("codec", codec),
    ]
    train_rows = [
        ("data", f"{d.source}{f' ({d.path})' if d.path else ''}, sequences of {d.seq_len} tokens, "
                 f"batch {d.batch_size} x {t.grad_accum} accumulation"),
        ("steps", f"{t.steps} (lr {o.lr:g}, warmup {o.warmup_steps}, EMA {t.ema_decay:g}, seed {t.seed})"),
        ("sampling defaults", f"{cfg.sample.steps} Euler steps, CFG {cfg.sample.cfg_scale:g}"),
    ]
    lines = ["---", "library_name: transfusion_mot", "pipeline_tag: text-to-image",
             "tags: [transfusion, mixture-of-transformers, text-to-image, image-to-text]", "---", "",
             f"# {cfg.name}", "",
             (f"A Chameleon-setting model (one next-token loss over text and VQ image codes) with a {m.arch} "
              f"backbone, trained with `transfusion_mot`." if m.setting == "chameleon" else
              f"A Transfusion model (next-token loss on text, rectified flow on {codec} latents) with a "
              f"{m.arch} backbone, trained with `transfusion_mot`."), "",
             "```python", "from transfusion_mot.pretrained import from_pretrained", "",
             'pipe = from_pretrained("<this folder or hub id>")', 'images = pipe("a red circle")  # PIL images',
             'captions = pipe.caption_files(["image.png"])', "```", "",
             "| model | |", "|---|---|", *(f"| {k} | {v} |" for k, v in model_rows), "",
             "| training | |", "|---|---|", *(f"| {k} | {v} |" for k, v in train_rows), ""]
    results = folder / "results.json"
    if results.is_file():
        values = {k: v for k, v in json.loads(results.read_text()).items() if isinstance(v, (int, float))}
        lines += ["## Results (end of training)", "", "| metric | value |", "|---|---|",
                  *(f"| {k} | {v:.4g} |" for k, v in values.items()), ""]
    if (folder / "samples.png").is_file():
        lines += ["## Samples (held-out prompts)", "", "![samples](samples.png)", ""]
    out = folder / "README.md"
    out.write_text("\n".join(lines))
    return out


def _param_count(weights: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (safe_open is not a dict)


# --------------------------------------------------------------------------------------------------
# The hub
# --------------------------------------------------------------------------------------------------
def looks_like_hub_id(name: str) -> bool:
    """``org/name`` (one slash, not a path that starts with /, ., ~)."""
    return name.count("/") == 1 and not name.startswith(("/", ".", "~")) and "\\" not in name


def download(repo_id: str, revision: str | None = None) -> Path:
    """The model folder of a hub repository, through huggingface_hub's cache."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=repo_id, revision=revision))
    except Exception as e:  # offline mode, no network, no such repository, gated: one line naming the id
        raise FileNotFoundError(f"model {repo_id!r} is not a local folder and could not be fetched from the "
                                f"Hugging Face hub ({type(e).__name__}: {_first_line(e)})") from None


def upload(folder: Path, repo_id: str, token: str | None = None, private: bool | None = None,
           commit_message: str = "Upload transfusion_mot model") -> str:
    """Create (or reuse) ``repo_id`` and upload ``folder``; returns the commit's URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                                 repo_type="model")
    except Exception as e:  # offline mode, no network, no or bad token: one line naming the repository
        raise HubError(f"push_to_hub({repo_id!r}) could not reach or write the Hugging Face hub "
                       f"({type(e).__name__}: {_first_line(e)}); save_pretrained(<folder>) keeps it here, to "
                       f"upload later with `hf upload {repo_id} <folder>`") from None
    return str(getattr(info, "commit_url", info))


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no message"
