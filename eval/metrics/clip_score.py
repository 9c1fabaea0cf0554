"""CLIP score (torchmetrics) of images generated from a prompt list, with a CLIP model by hub id or
local folder (default openai/clip-vit-large-patch14, which must be in the HF cache when offline).

    python eval/metrics/clip_score.py --ckpt runs/main --prompts ../shared/assets/prompts/drawbench.txt --out eval_out/clip \
        [--clip PATH] [--n 200] [--device cuda] [--dtype bf16]
    accelerate launch --num_processes 8 eval/metrics/clip_score.py ...   # each process generates its share of the prompts
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # eval/: common.py, shared by every eval script
from common import add_generation_args, generate_for_metric, md_table, read_prompts, write_results
from PIL import Image as PILImage
from torchvision.transforms.functional import pil_to_tensor

from transfusion_mot.metrics import MissingWeights


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_generation_args(p)
    p.add_argument("--clip", default="openai/clip-vit-large-patch14", help="CLIP hub id or local folder")
    args = p.parse_args(argv)
    from transfusion_mot.metrics.clip_score import clip_score, require_clip

    try:
        require_clip(args.clip)
    except MissingWeights as e:
        raise SystemExit(f"error: {e}")
    prompts = read_prompts(args.prompts, args.n)
    out = Path(args.out)
    paths, _ = generate_for_metric(args, prompts, out)
    if paths is None:  # under accelerate launch: the first process scores every image
        return
    images = torch.stack([pil_to_tensor(PILImage.open(p).convert("RGB")) for p in paths])
    value = clip_score(images, prompts, args.clip)
    result = {"metric": "CLIPScore", "value": value, "clip": args.clip, "n": len(prompts), "steps": args.steps,
              "cfg": args.cfg, "seed": args.seed, "ckpt": args.ckpt, "prompts": args.prompts}
    write_results("results", result, "# CLIP score\n\n{header}" + md_table([result]) + "\n", out)
    print(f"CLIPScore = {value:.4f} ({len(prompts)} images, {args.clip})")


if __name__ == "__main__":
    main()
