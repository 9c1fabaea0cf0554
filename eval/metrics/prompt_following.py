"""Prompt-following: shapes held-out prompts scored by the checker (with its chance level), or any prompt
list (e.g. GenEval's metadata) rendered as a grid for inspection (GenEval's detector is not offline).

    python eval/metrics/prompt_following.py --ckpt runs/main --out eval_out/pf [--n 64] [--steps 250]
    python eval/metrics/prompt_following.py --ckpt RUN --prompts ../shared/assets/prompts/geneval_metadata.jsonl --n 32 --out DIR
    accelerate launch --num_processes N eval/metrics/prompt_following.py ...   # the prompts split across processes
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # eval/: common.py, shared by every eval script
from common import add_device_args, generate_missing, load_pipeline, process_state, read_prompts, run_sampling_defaults, write_results
from PIL import Image as PILImage
from torchvision.transforms.functional import to_tensor

from transfusion_mot.components.tracking import save_grid


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--prompts", default=None, help="default: shapes held-out test prompts")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--steps", type=int, default=None, help="default: the run's sample.steps")
    p.add_argument("--cfg", type=float, default=None, help="default: the run's sample.cfg_scale")
    p.add_argument("--seed", type=int, default=None, help="default: the run's sample.seed")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", required=True)
    add_device_args(p)
    args = p.parse_args(argv)
    from transfusion_mot.metrics import shapes_checker as shapes

    state = process_state()
    pipe = load_pipeline(args, state)
    run_sampling_defaults(args, pipe)
    max_shapes = pipe.cfg.data.shapes_max_shapes
    prompts = (read_prompts(args.prompts, args.n) if args.prompts
               else shapes.held_out_prompts(args.n, split="test", max_shapes=max_shapes))
    out = Path(args.out)
    paths = generate_missing(pipe, prompts, out / "images", args.steps, args.cfg, args.seed, args.batch_size, state)
    if not state.is_main_process:  # under accelerate launch: the first process scores every image
        return
    images = torch.stack([to_tensor(PILImage.open(p).convert("RGB")) for p in paths])
    result = {"n": len(prompts), "steps": args.steps, "cfg": args.cfg, "seed": args.seed, "ckpt": args.ckpt,
              "prompts": args.prompts or "shapes test split"}
    scores = None
    if not args.prompts:
        scores = [shapes.check(img, q).score for img, q in zip(images, prompts)]
        result["prompt_following"] = sum(scores) / len(scores)
        result["chance"] = shapes.chance_score(resolution=images.shape[-1], max_shapes=max_shapes)
    save_grid(images[:64], prompts[:64], out / "grid.png", marks=scores[:64] if scores else None)
    md = "# Prompt-following\n\n{header}" + (
        f"Checker score **{result['prompt_following']:.4f}** on {len(prompts)} held-out shapes prompts "
        f"(chance {result['chance']:.4f}).\n" if scores else f"{len(prompts)} prompts rendered to grid.png.\n")
    write_results("results", result, md + "\n![grid](grid.png)\n", out)
    print(md.replace("{header}", ""))


if __name__ == "__main__":
    main()
