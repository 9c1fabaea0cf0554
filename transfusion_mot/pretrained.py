"""``from_pretrained(run_dir | model folder | hub id, device=, dtype=)``: the exported model with its tokenizer
and codec, ready to generate on any device: CUDA when present (else CPU) and, by default, bfloat16 weights on
CUDA and float32 on CPU (the training default, ``train.mixed_precision=auto``). ``dtype`` casts the
transformer; the codec stays float32 (its decoder writes the pixels every metric reads). ``pipe.to(device,
dtype)`` moves it later. ``pipe.save_pretrained(dir)`` / ``pipe.push_to_hub(repo_id)`` write the
self-contained folder of ``hub.py``.

``pipe(prompt, negative_prompt=, num_inference_steps=, guidance_scale=, num_images_per_prompt=, generator=,
output_type=)`` is the diffusers-style call (PIL images); ``generate`` (tensors, int seeds, the run's names
``steps``/``cfg_scale``), ``interleave`` (text and images in one document) and ``caption`` stay.

What notebooks, ``transfusion-mot generate|caption`` and the eval scripts use.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import Config
from .data.packing import Specials


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """None or "auto": CUDA when present, else CPU. A device that is not there is refused by name."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1, ...): {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but this torch sees no CUDA GPU")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r} asked for, but this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None or "auto": bfloat16 on CUDA, float32 elsewhere; else fp32 | bf16 | fp16 (or their long names)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


@dataclass
class Pipeline:
    model: torch.nn.Module
    cfg: Config
    tokenizer: object
    codec: torch.nn.Module
    source: Path | None = None  # the model folder it was loaded from (its results.json / samples.png travel on)

    @property
    def specials(self) -> Specials:
        return Specials.of(self.tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> "Pipeline":
        """Move the pipeline (``None``: keep the device; see ``resolve_device``) and cast the transformer's
        weights (``None``: keep the dtype; "auto": bfloat16 on CUDA, float32 elsewhere). Returns self."""
        device = self.device if device is None else resolve_device(device)
        self.model.to(device=device, dtype=None if dtype is None else resolve_dtype(dtype, device))
        self.codec.to(device)
        return self

    def encode_prompts(self, prompts: str | list[str], allow_empty: bool = False) -> list[list[int]]:
        """Token ids per prompt (a str is one prompt), cut to data.max_caption_tokens as in training."""
        from .sample import truncate_prompt

        prompts = as_prompts(prompts)
        for i, p in enumerate(prompts):
            if not p.strip() and not allow_empty:
                raise ValueError(f"prompt {i} is empty")
        return [truncate_prompt(self.tokenizer.encode(p), self.cfg.data.max_caption_tokens) for p in prompts]

    def sampling(self, **given) -> dict:
        """The given sampling arguments, each None replaced by the run's own value: ``sample.*`` of its
        config (``n`` is sample.n_per_prompt) and ``flow.shift`` for ``shift``."""
        s = self.cfg.sample
        run = {**{k: getattr(s, k) for k in vars(s)}, "n": s.n_per_prompt, "shift": self.cfg.flow.shift}
        return {k: run[k] if v is None else v for k, v in given.items()}

    @torch.no_grad()
    def generate(self, prompts: str | list[str], steps: int | None = None, cfg_scale: float | None = None,
                 seed: int | None = None, n: int | None = None, batch_size: int = 16, progress: bool = False,
                 first_index: int = 0, scheduler: str | None = None, shift: float | None = None,
                 negative_prompts: list[str] | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Images (len(prompts) * n, 3, H, W) in [0, 1], prompt-major order (``first_index``: see
        ``sample.generate_images``). Arguments left None take the run's config (``sampling``).
        ``negative_prompts``: one per prompt (CFG's unconditional context); ``noise``: see ``__call__``."""
        from .sample import generate_images

        if self.chameleon:
            return self._generate_tokens(prompts, cfg_scale, seed, n, batch_size, first_index, negative_prompts, noise)
        a = self.sampling(steps=steps, cfg_scale=cfg_scale, seed=seed, n=n, scheduler=scheduler, shift=shift)
        negative = None if negative_prompts is None else self.encode_prompts(negative_prompts, allow_empty=True)
        latents = generate_images(self.model, self.encode_prompts(prompts), self.specials, steps=a["steps"],
                                  cfg_scale=a["cfg_scale"], seed=a["seed"], n_per_prompt=a["n"],
                                  batch_size=batch_size, progress=progress, scheduler=a["scheduler"],
                                  shift=a["shift"], first_index=first_index, negative_ids=negative, noise=noise)
        return self.codec.decode(latents).float().clamp(0, 1)

    @property
    def chameleon(self) -> bool:
        """The Chameleon setting: images are VQ codes sampled token by token (``sample_tokens.py``)."""
        return self.cfg.model.setting == "chameleon"

    def _generate_tokens(self, prompts, cfg_scale, seed, n, batch_size, first_index, negative_prompts, noise):
        """Chameleon-setting images: codes sampled with CFG on logits (the run's sample.temperature / top_k /
        top_p), each image from its own ``seed`` stream, decoded by the VQ model."""
        from .sample_tokens import generate_image_tokens

        if negative_prompts is not None or noise is not None:
            raise ValueError(_CHAMELEON_REFUSES)
        a = self.sampling(cfg_scale=cfg_scale, seed=seed, n=n, temperature=None, top_k=None, top_p=None)
        codes = generate_image_tokens(self.model, self.encode_prompts(prompts), self.specials,
                                      cfg_scale=a["cfg_scale"], temperature=a["temperature"], top_k=a["top_k"],
                                      top_p=a["top_p"], seed=a["seed"], n_per_prompt=a["n"], batch_size=batch_size,
                                      n_codes=self.codec.codebook_size, first_index=first_index)
        return self.codec.decode(codes.to(self.device)).float().clamp(0, 1)

    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 num_images_per_prompt: int = 1, generator: torch.Generator | list[torch.Generator] | None = None,
                 output_type: str = "pil", seed: int | None = None, batch_size: int = 16, progress: bool = False):
        """Images for a prompt (a str) or prompts (a list), prompt-major, as a list of PIL images
        (``output_type="pt"``: a (N, 3, H, W) tensor in [0, 1]; ``"np"``: a (N, H, W, 3) float array).

        Arguments left None take the run's ``sample.*``. ``negative_prompt`` (one, or one per prompt) is
        what guidance steers away from: the unconditional context becomes ``BOS, negative, BOI``.
        ``generator``: one ``torch.Generator`` draws every image's starting noise in turn, a list gives
        one per image; without one, image k's noise is its own stream of ``seed`` (``rng.py``), so an
        image does not depend on the batch it was made in."""
        prompts = as_prompts(prompt)
        if self.chameleon and (negative_prompt is not None or generator is not None):  # before any draw
            raise ValueError(_CHAMELEON_REFUSES)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not one of {OUTPUT_TYPES}")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt={num_images_per_prompt} must be >= 1")
        negatives = None
        if negative_prompt is not None:
            negatives = as_prompts(negative_prompt, "negative_prompt")
            if len(negatives) == 1:
                negatives = negatives * len(prompts)
            if len(negatives) != len(prompts):
                raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts (give one, or one each)")
        n_images = len(prompts) * num_images_per_prompt
        noise = None if generator is None else self.initial_noise(generator, n_images)
        images = self.generate(prompts, steps=num_inference_steps, cfg_scale=guidance_scale, seed=seed,
                               n=num_images_per_prompt, batch_size=batch_size, progress=progress,
                               negative_prompts=negatives, noise=noise)
        return to_output(images, output_type)

    def initial_noise(self, generator: torch.Generator | list[torch.Generator], n: int) -> torch.Tensor:
        """(n, C, h, w) standard normal noise at t=1 from the caller's generator(s), on their device."""
        m = self.model.cfg
        shape = (m.latent_channels, m.latent_size, m.latent_size)
        if isinstance(generator, (list, tuple)):
            if len(generator) != n:
                raise ValueError(f"{len(generator)} generators for {n} images (give one, or one per image)")
            return torch.stack([torch.randn(shape, generator=g, device=g.device) for g in generator]).cpu()
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}")
        return torch.randn((n, *shape), generator=generator, device=generator.device).cpu()

    @torch.no_grad()
    def interleave(self, prompt: str, max_images: int = 2, start_with_image: bool = False,
                   max_new_tokens: int | None = None, num_inference_steps: int | None = None,
                   guidance_scale: float | None = None, temperature: float | None = None, top_k: int | None = None,
                   top_p: float | None = None, seed: int | None = None) -> list:
        """One document continued from ``prompt``: text until the model opens an image, the image by flow
        (conditioned on everything before it), then text again (``sample.generate_interleaved``). Returns
        the whole document's parts in order (the prompt's text first): ``str`` for text, PIL images for
        images. ``start_with_image``: an image right after the prompt."""
        from .data.segments import Image
        from .sample import generate_interleaved

        if self.chameleon:
            raise ValueError("interleaved generation is implemented for the Transfusion setting only; a Chameleon-"
                             "setting model generates images (pipe(...)) and captions (pipe.caption)")
        if not isinstance(prompt, str):
            raise ValueError(f"interleave takes one prompt (a str), got {type(prompt).__name__}")
        a = self.sampling(max_new_tokens=max_new_tokens, steps=num_inference_steps, cfg_scale=guidance_scale,
                          temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, scheduler=None, shift=None)
        ids = self.encode_prompts([prompt], allow_empty=True)[0] + ([self.specials.boi] if start_with_image else [])
        segments = generate_interleaved(self.model, ids, self.specials, max_images=max_images, **a)
        out = []
        for seg in segments:
            if isinstance(seg, Image):
                out += to_output(self.codec.decode(seg.latent[None].to(self.device)).float(), "pil")
            else:
                out.append(self.tokenizer.decode(seg.ids))
        return out

    def save_pretrained(self, save_directory: str | Path) -> Path:
        """The self-contained model folder (``hub.py``): weights, config, tokenizer, codec, model card."""
        from .components.checkpoint import export_model
        from .hub import add_parts

        return export_model(self.model, self.cfg, save_directory,
                            parts=lambda d: add_parts(d, self.cfg, self.tokenizer, self.codec, source=self.source))

    def push_to_hub(self, repo_id: str, token: str | None = None, private: bool | None = None,
                    commit_message: str = "Upload transfusion_mot model") -> str:
        """``save_pretrained`` into a temporary folder, then create ``repo_id`` (if needed) and upload it
        with huggingface_hub; returns the commit URL. Offline or without a token: ``hub.HubError``."""
        import tempfile

        from .hub import upload

        with tempfile.TemporaryDirectory(prefix="tfm-push-") as tmp:
            folder = self.save_pretrained(Path(tmp) / "model")
            return upload(folder, repo_id, token=token, private=private, commit_message=commit_message)

    def generate_to_dir(self, prompts: list[str], out: str | Path, **kw) -> list[Path]:
        """PNG per image plus ``grid.png`` with the prompts under the images."""
        from .components.tracking import save_grid, save_png

        n = self.sampling(n=kw.get("n"))["n"]
        images = self.generate(prompts, progress=True, **kw)
        out = Path(out)
        paths = [save_png(img, out / f"{i // n:04d}_{i % n}.png") for i, img in enumerate(images)]
        captions = [prompts[i // n] for i in range(len(images))]
        paths.append(save_grid(images, captions, out / "grid.png", ncol=max(n, min(8, len(images)))))
        return paths

    @torch.no_grad()
    def caption(self, images: torch.Tensor, seed: int | None = None, temperature: float | None = None,
                top_k: int | None = None, top_p: float | None = None, max_new_tokens: int | None = None) -> list[str]:
        """Captions for (N, 3, H, W) images in [0, 1] at the model's resolution; arguments left None take
        the run's ``sample.*`` (greedy unless its sample.temperature says otherwise)."""
        from .sample import caption_images

        a = self.sampling(seed=seed, temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens)
        if not math.isfinite(a["temperature"]) or a["temperature"] < 0:
            raise ValueError(f"temperature={a['temperature']} must be a finite number >= 0 (0 = greedy)")
        latents = self.codec.encode(images.to(self.device))
        if self.chameleon:  # the image's VQ codes, then text
            from .sample_tokens import caption_image_tokens

            ids = caption_image_tokens(self.model, latents, self.specials, **a)
        else:
            ids = caption_images(self.model, latents, self.specials, **a)
        return [self.tokenizer.decode(x) for x in ids]

    def caption_files(self, paths: list[str], **kw) -> list[str]:
        from PIL import Image as PILImage

        from .data.transform import ImageTransform

        tf = ImageTransform(self.cfg.data.resolution, crop="center", min_side=1)
        images = []
        for p in paths:  # every file decoded before any captioning: a bad one stops the job in one line
            try:
                with PILImage.open(p) as im:
                    images.append(tf(im.convert("RGB")))
            except (OSError, SyntaxError, ValueError) as e:  # not an image, truncated, corrupt (PIL's errors)
                raise ValueError(f"{p}: not an image that can be read ({type(e).__name__}: {e})") from None
        return self.caption(torch.stack(images), **kw)


def from_pretrained(path_or_hub_id: str | Path, device: str | torch.device | None = None,
                    dtype: str | torch.dtype | None = None, revision: str | None = None) -> Pipeline:
    """Load a model folder (``save_pretrained``'s, or a run directory's ``model/``), or a hub id
    (``org/name``, fetched with huggingface_hub into its cache), on ``device`` (default: CUDA when present,
    else CPU) with the transformer in ``dtype`` (default: bfloat16 on CUDA, float32 on CPU). The device
    and dtype are checked before anything is read."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    from .components.checkpoint import load_exported
    from .data.pipeline import load_run_codec, prepare_tokenizer
    from .hub import download, is_self_contained, localize, looks_like_hub_id
    from .model import build_model

    run_dir = Path(path_or_hub_id).expanduser()
    if not run_dir.exists():
        if not looks_like_hub_id(str(path_or_hub_id)):
            raise FileNotFoundError(f"checkpoint {run_dir} does not exist (give a run directory, a model folder "
                                    f"or a hub id org/name)")
        run_dir = download(str(path_or_hub_id), revision)
    model_dir = run_dir / "model" if (run_dir / "model").is_dir() else run_dir
    cfg, state = load_exported(model_dir)
    cfg = localize(cfg, model_dir)  # the folder's own tokenizer and codec
    tokenizer = prepare_tokenizer(cfg)
    if not cfg.model.vocab_size and "adapters.0.emb.weight" in state:  # the rows it was trained with (any rounding)
        cfg.model.vocab_size = int(state["adapters.0.emb.weight"].shape[0])
    model = build_model(cfg.model, tokenizer.vocab_size)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{model_dir}: weights do not fit the model its config.json describes: {e}") from None
    if is_self_contained(model_dir) and cfg.codec.kind == "vq":
        from .data.vq import load_image_tokenizer

        codec = load_image_tokenizer(cfg.codec)
    elif is_self_contained(model_dir):
        from .data.codec import load_codec

        codec = load_codec(cfg.codec)
    else:  # an export from before model folders carried their codec: the run's vae/ beside it
        codec = load_run_codec(cfg, model_dir.parent if model_dir.name == "model" else model_dir)
    return Pipeline(model.to(device=device, dtype=dtype).eval(), cfg, tokenizer, codec.to(device).eval(), model_dir)


OUTPUT_TYPES = ("pil", "pt", "np")
_CHAMELEON_REFUSES = ("negative_prompt and generator are not supported in the Chameleon setting (codes are drawn "
                      "from each image's own seed stream; guidance's unconditional context is BOS BOI)")


def as_prompts(prompt, what: str = "prompt") -> list[str]:
    """A str is one prompt; a list or tuple of str, several (never a string read character by character)."""
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise ValueError(f"{what} must be a str or a non-empty list of str, got {prompt!r}")
    bad = [i for i, p in enumerate(prompt) if not isinstance(p, str)]
    if bad:
        raise ValueError(f"{what} {bad[0]} is a {type(prompt[bad[0]]).__name__}, not a str")
    return list(prompt)


def to_output(images: torch.Tensor, output_type: str):
    """(N, 3, H, W) in [0, 1] -> PIL images ("pil"), the tensor ("pt") or a (N, H, W, 3) array ("np")."""
    if output_type == "pt":
        return images
    array = images.float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    if output_type == "np":
        return array
    from PIL import Image as PILImage

    return [PILImage.fromarray((a * 255).round().astype("uint8")) for a in array]
