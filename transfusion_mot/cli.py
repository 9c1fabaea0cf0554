"""The ``transfusion-mot`` command: main, train, generate, caption, demo, train-vae, encode, params."""
from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

from .config import SCHEDULERS

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def find_config(name: str) -> str:
    """A config path as given, else configs/<name>(.yaml) next to the package (editable installs)."""
    for candidate in (Path(name), REPO_CONFIGS / name, REPO_CONFIGS / f"{name}.yaml"):
        if candidate.is_file():
            return str(candidate)
    raise SystemExit(f"error: config {name!r} not found (looked in . and {REPO_CONFIGS})")


def cmd_main(args: argparse.Namespace) -> None:
    """The main job: train MoT on shapes (VAE included), sample, evaluate, write the report."""
    from .config import load_config
    from .train import Stop, train

    cfg = load_config(find_config(args.config), args.overrides + ["train.overwrite=true"] * args.overwrite)
    try:
        run_dir = train(cfg)
    except Stop as e:
        raise SystemExit(f"error: {e}")
    print(f"\nreport: {run_dir / 'report.md'}")


def cmd_train(args: argparse.Namespace) -> None:
    from .train import main as train_main

    argv = (["--config", find_config(args.config)] if args.config else []) + args.overrides
    if args.resume:
        argv += ["--resume", args.resume]
    argv += ["--overwrite"] * args.overwrite + ["--allow-config-change"] * args.allow_config_change
    train_main(argv + (["--no-eval"] if args.no_eval else []))


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise SystemExit(f"error: --prompts-file {path} does not exist")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise SystemExit("error: give at least one --prompt or a --prompts-file")
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise SystemExit(f"error: prompt {empty[0]} is empty; give a text prompt "
                         "(for an unconditional sample, use any prompt with --cfg 0)")
    return prompts


GENERATED = re.compile(r"(\d{4}_\d+|grid)\.png")  # what generate writes: <prompt>_<image>.png and grid.png
DOCUMENT = re.compile(r"\d{4}\.md")  # generate --interleaved: one markdown document per prompt


def _check_generate_args(args: argparse.Namespace) -> None:
    """Every argument of ``generate`` checked before the model is read or a folder is made."""
    from .pretrained import resolve_device, resolve_dtype
    from .sample import MAX_SEED

    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"error: --steps {args.steps} must be >= 1")
    if args.cfg is not None and (not math.isfinite(args.cfg) or args.cfg < 0):
        raise SystemExit(f"error: --cfg {args.cfg} must be a finite number >= 0")
    if args.n is not None and args.n < 1:
        raise SystemExit(f"error: --n {args.n} must be >= 1 (images per prompt)")
    if args.shift is not None and not args.shift > 0:
        raise SystemExit(f"error: --shift {args.shift} must be > 0")
    if args.seed is not None and not -MAX_SEED <= args.seed <= MAX_SEED:
        raise SystemExit(f"error: --seed {args.seed} must lie in [-{MAX_SEED}, {MAX_SEED}] (a signed 64-bit integer)")
    if args.max_images < 0:
        raise SystemExit(f"error: --max-images {args.max_images} must be >= 0")
    if args.temperature is not None and (not math.isfinite(args.temperature) or args.temperature < 0):
        raise SystemExit(f"error: --temperature {args.temperature} must be a finite number >= 0 (0 = greedy)")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise SystemExit(f"error: --max-new-tokens {args.max_new_tokens} must be >= 1")
    resolve_dtype(args.dtype, resolve_device(args.device))  # a bad --device / --dtype stops here (ValueError)


def _stale_images(out: Path, overwrite: bool) -> list[Path]:
    """Images already in ``out``: refused unless ``--overwrite``, and then only generate's own files are
    replaced (returned, deleted just before the new ones are written); anything else there is never touched."""
    if not out.is_dir():
        return []
    images = sorted(p for p in out.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    images += sorted(p for p in out.iterdir() if DOCUMENT.fullmatch(p.name))
    if images and not overwrite:
        raise SystemExit(f"error: output dir {out} already holds {len(images)} image(s) ({images[0].name}, ...); "
                         "pass --overwrite to replace generate's images there, or choose another --out")
    foreign = [p for p in images if not (GENERATED.fullmatch(p.name) or DOCUMENT.fullmatch(p.name))]
    if foreign:
        raise SystemExit(f"error: output dir {out} holds images generate did not write ({foreign[0].name}, ...): "
                         "--overwrite replaces only generate's own files; choose another --out")
    return images


def _check_out_dir(out: str) -> Path:
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise SystemExit(f"error: output dir {path} is not writable ({e.strerror})")
    return path


def cmd_generate(args: argparse.Namespace) -> None:
    from .pretrained import from_pretrained

    prompts = _read_prompts(args)
    _check_generate_args(args)
    stale = _stale_images(Path(args.out), args.overwrite)
    pipe = from_pretrained(args.ckpt, args.device, args.dtype)  # a bad checkpoint stops here, before the output dir
    out = _check_out_dir(args.out)
    for path in stale:  # --overwrite: never a mix of new and stale files
        path.unlink()
    if args.interleaved:
        _write_interleaved(pipe, prompts, out, args)
        return
    negative = None if args.negative_prompt is None else [args.negative_prompt] * len(prompts)
    paths = pipe.generate_to_dir(prompts, out, steps=args.steps, cfg_scale=args.cfg, seed=args.seed, n=args.n,
                                 scheduler=args.scheduler, shift=args.shift,
                                 negative_prompts=negative)  # None: the run's own config
    print(f"wrote {len(paths) - 1} images and {paths[-1]}")


def _write_interleaved(pipe, prompts: list[str], out: Path, args: argparse.Namespace) -> None:
    """Per prompt, ``NNNN.md``: the document's text with its images (``NNNN_K.png``) in place."""
    n_images = 0
    for i, prompt in enumerate(prompts):
        parts = pipe.interleave(prompt, max_images=args.max_images, max_new_tokens=args.max_new_tokens,
                                num_inference_steps=args.steps, guidance_scale=args.cfg, seed=args.seed,
                                temperature=args.temperature, start_with_image=args.start_with_image)
        lines, k = [], 0  # the document starts with the prompt's own text
        for part in parts:
            if isinstance(part, str):
                lines.append(part)
            else:
                part.save(out / f"{i:04d}_{k}.png")
                lines.append(f"![image {k}]({i:04d}_{k}.png)")
                k += 1
        (out / f"{i:04d}.md").write_text("\n\n".join(lines) + "\n")
        n_images += k
    print(f"wrote {len(prompts)} document(s) with {n_images} image(s) to {out}")


def cmd_caption(args: argparse.Namespace) -> None:
    from .pretrained import from_pretrained

    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        raise SystemExit(f"error: image not found: {missing[0]}")
    if args.temperature is not None and (not math.isfinite(args.temperature) or args.temperature < 0):
        raise SystemExit(f"error: --temperature {args.temperature} must be a finite number >= 0 (0 = greedy)")
    pipe = from_pretrained(args.ckpt, args.device, args.dtype)
    texts = pipe.caption_files(args.images, seed=args.seed, temperature=args.temperature, top_k=args.top_k,
                               top_p=args.top_p, max_new_tokens=args.max_new_tokens)  # None: the run's sample.*
    for path, text in zip(args.images, texts):
        print(f"{path}\t{text}")


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import require_server, serve

    try:
        require_server()
    except ImportError as e:  # fastapi / uvicorn missing: the message names the [demo] extra
        raise SystemExit(f"error: {e}")
    serve(args.ckpt, host=args.host, port=args.port, device=args.device, dtype=args.dtype)


def cmd_train_vae(args: argparse.Namespace) -> None:
    from .config import load_config
    from .data.pipeline import train_codec_for

    cfg = load_config(find_config(args.config) if args.config else None, args.overrides)
    codec_dir = train_codec_for(cfg, Path(args.out))
    print(f"VAE written to {codec_dir} (use codec.kind=trained codec.path={codec_dir})")


def cmd_encode(args: argparse.Namespace) -> None:
    from .data.encode import main as encode_main

    argv = (["--config", args.config] if args.config else []) + ["--out", args.out, "--shard-size",
                                                                 str(args.shard_size), "--dtype", args.dtype]
    encode_main(argv + args.overrides)


def cmd_params(args: argparse.Namespace) -> None:
    from .components.flops import main as flops_main

    flops_main()


def _add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: CUDA when present, else CPU)")
    p.add_argument("--dtype", default=None, help="auto (default: bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16")


def _add_demo_parser(sub) -> None:
    s = sub.add_parser("demo", help="a web page: prompt -> images, image -> caption (the [demo] extra)")
    s.add_argument("--ckpt", required=True, help="run directory, model folder or hub id (org/name)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=7860, help="0: any free port (the URL is printed)")
    _add_device_args(s)
    s.set_defaults(fn=cmd_demo)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="transfusion-mot", description="Transfusion on a Mixture-of-Transformers backbone")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("main", help="the main job: train on shapes, sample, evaluate, report")
    s.add_argument("--config", default="main")
    s.add_argument("--overwrite", action="store_true", help="start over in a run dir that holds a run")
    s.add_argument("overrides", nargs="*")
    s.set_defaults(fn=cmd_main)

    s = sub.add_parser("train", help="train (same as python -m transfusion_mot.train)")
    s.add_argument("--config", default=None)
    s.add_argument("--resume", default=None)
    s.add_argument("--overwrite", action="store_true", help="start over in a run dir that holds a run")
    s.add_argument("--allow-config-change", action="store_true", help="resume even if the data order changes")
    s.add_argument("--no-eval", action="store_true")
    s.add_argument("overrides", nargs="*")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("generate", help="images from prompts (--interleaved: documents of text and images)")
    s.add_argument("--ckpt", required=True, help="run directory, model folder or hub id (org/name)")
    s.add_argument("--prompt", action="append", help="repeat for several prompts")
    s.add_argument("--prompts-file", default=None, help="one prompt per line")
    s.add_argument("--steps", type=int, default=None, help="Euler steps (default: the run's sample.steps)")
    s.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (default: sample.cfg_scale)")
    s.add_argument("--scheduler", default=None, choices=SCHEDULERS, help="time grid (default: sample.scheduler)")
    s.add_argument("--shift", type=float, default=None, help="time shift of the grid (default: the run's flow.shift)")
    s.add_argument("--seed", type=int, default=None, help="default: sample.seed")
    s.add_argument("--n", type=int, default=None, help="images per prompt (default: sample.n_per_prompt)")
    s.add_argument("--negative-prompt", default=None, help="what guidance steers away from (default: none)")
    s.add_argument("--interleaved", action="store_true",
                   help="continue each prompt as one document of text and images: NNNN.md + NNNN_K.png")
    s.add_argument("--start-with-image", action="store_true", help="--interleaved: an image right after the prompt")
    s.add_argument("--max-images", type=int, default=2, help="--interleaved: images per document at most")
    s.add_argument("--max-new-tokens", type=int, default=None, help="--interleaved: default sample.max_new_tokens")
    s.add_argument("--temperature", type=float, default=None, help="--interleaved: default sample.temperature")
    s.add_argument("--out", required=True)
    s.add_argument("--overwrite", action="store_true", help="replace the images an earlier generate wrote in --out")
    _add_device_args(s)
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("caption", help="captions for images")
    s.add_argument("--ckpt", required=True, help="run directory, model folder or hub id (org/name)")
    s.add_argument("--seed", type=int, default=None, help="default: the run's sample.seed")
    s.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: sample.temperature)")
    s.add_argument("--top-k", type=int, default=None, help="default: sample.top_k")
    s.add_argument("--top-p", type=float, default=None, help="default: sample.top_p")
    s.add_argument("--max-new-tokens", type=int, default=None, help="default: sample.max_new_tokens")
    _add_device_args(s)
    s.add_argument("images", nargs="+")
    s.set_defaults(fn=cmd_caption)

    _add_demo_parser(sub)

    s = sub.add_parser("train-vae", help="train the small AutoencoderKL on a data source")
    s.add_argument("--config", default=None)
    s.add_argument("--out", required=True)
    s.add_argument("overrides", nargs="*")
    s.set_defaults(fn=cmd_train_vae)

    s = sub.add_parser("encode", help="encode a source once into shards of latents + token ids + captions "
                                      "(multi-process: accelerate launch -m transfusion_mot.data.encode)")
    s.add_argument("--config", default=None)
    s.add_argument("--out", required=True, help="folder for encode.json and the train/ and val/ shards")
    s.add_argument("--shard-size", type=int, default=1000, help="records per shard for map-style sources")
    s.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="latent storage type")
    s.add_argument("overrides", nargs="*")
    s.set_defaults(fn=cmd_encode)

    s = sub.add_parser("params", help="parameter and FLOP table of every named size")
    s.set_defaults(fn=cmd_params)

    args = p.parse_args(argv)
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError) as e:  # config and input errors: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
