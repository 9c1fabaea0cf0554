"""``from_pretrained(run_dir, device=, dtype=)``: the exported model with its tokenizer and codec, ready to
generate on any device: CUDA when present (else CPU) and, by default, bfloat16 weights on CUDA and float32
on CPU (the training default, ``train.mixed_precision=auto``). ``dtype`` casts the transformer; the codec
stays float32 (its decoder writes the pixels every metric reads). ``pipe.to(device, dtype)`` moves it later.

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

    def encode_prompts(self, prompts: list[str]) -> list[list[int]]:
        from .sample import truncate_prompt

        for i, p in enumerate(prompts):
            if not p.strip():
                raise ValueError(f"prompt {i} is empty")
        return [truncate_prompt(self.tokenizer.encode(p), self.cfg.data.max_caption_tokens) for p in prompts]

    def sampling(self, **given) -> dict:
        """The given sampling arguments, each None replaced by the run's own value: ``sample.*`` of its
        config (``n`` is sample.n_per_prompt) and ``flow.shift`` for ``shift``."""
        s = self.cfg.sample
        run = {**{k: getattr(s, k) for k in vars(s)}, "n": s.n_per_prompt, "shift": self.cfg.flow.shift}
        return {k: run[k] if v is None else v for k, v in given.items()}

    @torch.no_grad()
    def generate(self, prompts: list[str], steps: int | None = None, cfg_scale: float | None = None,
                 seed: int | None = None, n: int | None = None, batch_size: int = 16, progress: bool = False,
                 first_index: int = 0, scheduler: str | None = None, shift: float | None = None) -> torch.Tensor:
        """Images (len(prompts) * n, 3, H, W) in [0, 1], prompt-major order (``first_index``: see
        ``sample.generate_images``). Arguments left None take the run's config (``sampling``)."""
        from .sample import generate_images

        a = self.sampling(steps=steps, cfg_scale=cfg_scale, seed=seed, n=n, scheduler=scheduler, shift=shift)
        latents = generate_images(self.model, self.encode_prompts(prompts), self.specials, steps=a["steps"],
                                  cfg_scale=a["cfg_scale"], seed=a["seed"], n_per_prompt=a["n"],
                                  batch_size=batch_size, progress=progress, scheduler=a["scheduler"],
                                  shift=a["shift"], first_index=first_index)
        return self.codec.decode(latents).float().clamp(0, 1)

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
        latents = self.codec.encode(images)
        ids = caption_images(self.model, latents, self.specials, **a)
        return [self.tokenizer.decode(x) for x in ids]

    def caption_files(self, paths: list[str], **kw) -> list[str]:
        from PIL import Image as PILImage

        from .data.sources import ImageTransform

        tf = ImageTransform(self.cfg.data.resolution, crop="center", min_side=1)
        images = []
        for p in paths:  # every file decoded before any captioning: a bad one stops the job in one line
            try:
                with PILImage.open(p) as im:
                    images.append(tf(im.convert("RGB")))
            except (OSError, SyntaxError, ValueError) as e:  # not an image, truncated, corrupt (PIL's errors)
                raise ValueError(f"{p}: not an image that can be read ({type(e).__name__}: {e})") from None
        return self.caption(torch.stack(images), **kw)


def from_pretrained(run_dir: str | Path, device: str | torch.device | None = None,
                    dtype: str | torch.dtype | None = None) -> Pipeline:
    """Load ``run_dir/model`` (or a model folder itself) with the run's tokenizer and codec, on ``device``
    (default: CUDA when present, else CPU) with the transformer in ``dtype`` (default: bfloat16 on CUDA,
    float32 on CPU). The device and dtype are checked before anything is read."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    from .components.checkpoint import load_exported
    from .data.pipeline import load_run_codec, prepare_tokenizer
    from .model import build_model

    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise FileNotFoundError(f"checkpoint {run_dir} does not exist (give a run directory)")
    model_dir = run_dir / "model" if (run_dir / "model").is_dir() else run_dir
    cfg, state = load_exported(model_dir)
    tokenizer = prepare_tokenizer(cfg)
    if not cfg.model.vocab_size and "tok_emb.weight" in state:  # the rows it was trained with (any rounding)
        cfg.model.vocab_size = int(state["tok_emb.weight"].shape[0])
    model = build_model(cfg.model, tokenizer.vocab_size)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{model_dir}: weights do not fit the model its config.json describes: {e}") from None
    codec = load_run_codec(cfg, model_dir.parent if model_dir.name == "model" else model_dir)
    return Pipeline(model.to(device=device, dtype=dtype).eval(), cfg, tokenizer, codec.to(device).eval())
