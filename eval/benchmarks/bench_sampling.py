"""Sampling speed: seconds per image and per step of 250-step flow sampling at the ``small`` size, with
and without the cached prompt and with and without CFG, for a 64-token prompt and 64- or 256-patch
images. The reference for the cache is a forward pass over the image tokens alone (the least any
step can cost): goal (issue 7) cached step <= 1.2x that.

    python eval/benchmarks/bench_sampling.py [--steps 250] [--images 4] [--reps 3]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # eval/: common.py, shared by every eval script
from common import md_table, median_time, write_results

from transfusion_mot.config import SampleConfig, load_config
from transfusion_mot.data.packing import IMAGE, Specials
from transfusion_mot.model import build_model
from transfusion_mot.model.inputs import ModelInput
from transfusion_mot.model.layers import patchify_each
from transfusion_mot.sample import sample_latents

SPECIALS = Specials(bos=256, eos=257, pad=258, boi=259, eoi=260)
GOAL = 1.2


def image_only_forward(model, rows: int, n_patches_side: int) -> callable:
    """One forward over the image tokens of ``rows`` images with no context at all."""
    cfg = model.cfg
    n = (n_patches_side // cfg.patch_size) ** 2
    shape = (rows, n)
    patches, image_shape = patchify_each(torch.randn(rows, cfg.latent_channels, n_patches_side, n_patches_side),
                                         cfg.patch_size)
    batch = ModelInput(tokens=torch.full(shape, SPECIALS.pad), modality=torch.full(shape, IMAGE),
                       doc_id=torch.zeros(shape, dtype=torch.long), image_id=torch.arange(rows)[:, None].expand(shape),
                       position=torch.arange(n).expand(shape), patches=patches, image_shape=image_shape,
                       t=torch.full((rows,), 0.5))
    return lambda: model(batch)


def run(latent_size: int, images: int, steps: int, reps: int) -> list[dict]:
    cfg = load_config(None, ["model.size=small", f"model.latent_size={latent_size}", "data.resolution=" +
                             str(latent_size * 4), "data.seq_len=512"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 261).eval()
    torch.nn.init.normal_(model.adapters[1].out.weight, std=0.02)
    prompts = [list(range(64)) for _ in range(images)]
    n_patches = (latent_size // cfg.model.patch_size) ** 2
    rows = []
    with torch.no_grad():
        floor = median_time(image_only_forward(model, images, latent_size), reps=max(reps, 5))
        for guided in (False, True):
            for cached in (True, False):
                noise = torch.randn(images, cfg.model.latent_channels, latent_size, latent_size)

                def go():
                    scale = SampleConfig.cfg_scale if guided else 1.0
                    sample_latents(model, prompts, SPECIALS, noise, steps=steps, cfg_scale=scale, use_cache=cached)
                t0 = time.perf_counter()
                seconds = median_time(go, reps=reps, warmup=0) if steps <= 50 else _once(go, t0)
                per_step = seconds / steps
                row = {"patches": n_patches, "cfg": guided, "prompt_cache": cached,
                       "s_per_image": seconds / images, "ms_per_step": 1e3 * per_step,
                       "step_over_image_forward": per_step / (floor * (2 if guided else 1))}
                rows.append(row)
                print(row, flush=True)
    return rows


def _once(fn, t0) -> float:
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=SampleConfig.steps)
    p.add_argument("--images", type=int, default=4, help="images per batch")
    p.add_argument("--reps", type=int, default=3, help="repetitions when steps <= 50")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    rows = run(16, args.images, args.steps, args.reps) + run(32, args.images, args.steps, args.reps)
    worst = max(r["step_over_image_forward"] for r in rows if r["prompt_cache"])
    md = ["# Sampling speed (small size)", "{header}",
          f"{args.steps} Euler steps, batches of {args.images} images, 64-token prompt. `step_over_image_forward`: "
          "one sampling step divided by one forward over the image tokens alone (x2 with CFG, which doubles the "
          f"rows). Goal: cached step <= {GOAL}x. Worst cached ratio: **{worst:.3f}** "
          f"({'met' if worst <= GOAL else 'not met'}).", "", md_table(rows)]
    write_results("bench_sampling", {"steps": args.steps, "images": args.images, "rows": rows,
                                     "goal": GOAL, "worst_cached_ratio": worst}, "\n".join(md) + "\n", args.out)


if __name__ == "__main__":
    main()
