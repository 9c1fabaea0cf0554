"""The Chameleon setting's image tokenizer on shapes at 64 px: which small VQModel to train by default.

For each setting, train the VQModel on the main job's data (configs/main.yaml) and measure on held-out
data: reconstruction PSNR, codebook usage (perplexity, codes used), training CPU seconds, and the
shapes checker's score of the reconstructions of the real held-out scenes (the ceiling, as
evaluate.py ``codec_ceiling`` computes it for the VAE), with the facts behind it.

Times: the machine is shared, so each run is timed in process CPU seconds on one thread, next to the
main job's VAE for ``--ref-steps`` steps measured the same way; "est. idle s" scales the VAE's measured
107 s for 600 steps on the idle 2-core CPU (eval/results/main_job.md) by that ratio.

    OMP_NUM_THREADS=1 python eval/experiments/vq_tokenizer.py --settings 4x-1024,8x-1024 [--ref-steps 60]

Rows accumulate in eval/results/vq_tokenizer.json (one per setting, re-running a setting replaces it).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # eval/: common.py, shared by every eval script
from common import REPO, RESULTS, commit, md_table, write_results

from transfusion_mot.config import load_config
from transfusion_mot.data import shapes
from transfusion_mot.metrics import shapes_checker
from transfusion_mot.data.pipeline import build_records
from transfusion_mot.data.run_codec import _vae_images
from transfusion_mot.data.vq import ImageTokenizer
from transfusion_mot.data import vq_train

VAE_IDLE_SECONDS_PER_600 = 107.0  # eval/results/main_job.md: the main job's VAE, 600 steps, idle 2-core CPU
N_SCENES = 64  # held-out scenes of the ceiling (the main job scores 64 prompts)

# name -> train_vq keyword arguments over the defaults below
BASE = dict(channels=(32, 64, 64), latent_channels=4, codebook_size=1024, steps=600, chroma_weight=10.0,
            restart_codes=True, ema=0.0)
EIGHT = (32, 64, 64, 64)
SETTINGS = {
    "default": None,  # the CodecConfig defaults, trained through vq_train.train_tokenizer_for (the run's path)
    "4x-1024": {},
    "4x-256": dict(codebook_size=256),
    "4x-256-d8-ema": dict(codebook_size=256, latent_channels=8, ema=0.99),
    "4x-1024-no-restarts": dict(restart_codes=False),
    "4x-1024-no-chroma": dict(chroma_weight=0.0),
    "4x-1024-300steps": dict(steps=300),
    "4x-1024-d8": dict(latent_channels=8),
    "4x-1024-ema": dict(ema=0.99),
    "4x-1024-d8-ema": dict(latent_channels=8, ema=0.99),
    "8x-1024": dict(channels=EIGHT),
    "8x-256": dict(channels=EIGHT, codebook_size=256),
    "8x-1024-d8": dict(channels=EIGHT, latent_channels=8),
    "8x-1024-d8-ema": dict(channels=EIGHT, latent_channels=8, ema=0.99),
    "8x-1024-wide": dict(channels=(64, 64, 128, 128), latent_channels=8),
    "8x-1024-1200steps": dict(channels=EIGHT, steps=1200),
}


def facts(roundtrip, cfg) -> tuple[float, dict[str, float]]:
    """The ceiling (shapes_checker.reconstruction_score) and the share of each kind of fact that holds."""
    d = cfg.data
    score = shapes_checker.reconstruction_score(roundtrip, n=N_SCENES, resolution=d.resolution,
                                                max_shapes=d.shapes_max_shapes, textured=d.shapes_textured)
    scenes = shapes_checker.held_out_scenes(N_SCENES, max_shapes=d.shapes_max_shapes, textured=d.shapes_textured)
    pixels = torch.stack([torch.from_numpy(shapes_checker._as_array(shapes.render(s, d.resolution))).permute(2, 0, 1)
                          for s in scenes])
    kinds: dict[str, list[bool]] = {}
    for img, scene in zip(roundtrip(pixels), scenes):
        for key, ok in shapes_checker.check(img, shapes.caption(scene)).facts.items():
            kinds.setdefault(key.split(".")[-1], []).append(ok)
    return score, {k: sum(v) / len(v) for k, v in kinds.items()}


def vae_cpu_per_step(cfg, steps: int) -> float:
    """CPU seconds per step of the main job's VAE (same images, crop and batch), for the time scale."""
    from transfusion_mot.data.vae_train import train_vae

    c = cfg.codec
    images = _vae_images(build_records(cfg.data, "train"), cfg.data.resolution)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.process_time()
        train_vae(images, Path(tmp) / "vae", resolution=cfg.data.resolution, steps=steps,
                  channels=tuple(c.vae_channels), latent_channels=c.vae_latent_channels,
                  latent_noise=c.vae_latent_noise, chroma_weight=c.vae_chroma_weight)
        return (time.process_time() - t0) / steps


def run(name: str, cfg, vae_step_cpu: float) -> dict:
    setting = SETTINGS[name.split("@")[0]]
    c = cfg.codec
    kw = {**BASE, **setting} if setting is not None else dict(
        channels=tuple(c.vq_channels), latent_channels=c.vq_latent_channels, codebook_size=c.vq_codebook_size,
        steps=c.vq_steps, chroma_weight=c.vq_chroma_weight, restart_codes=True, ema=vq_train.EMA)
    images = _vae_images(build_records(cfg.data, "train"), cfg.data.resolution, seed=cfg.train.seed)
    held_out = _vae_images(build_records(cfg.data, "val"), cfg.data.resolution)
    with tempfile.TemporaryDirectory() as tmp:
        t0, w0 = time.process_time(), time.perf_counter()
        if setting is None:
            folder = vq_train.train_tokenizer_for(cfg, out=Path(tmp) / "vq")
        else:
            folder = vq_train.train_vq(images, Path(tmp) / "vq", resolution=cfg.data.resolution, seed=cfg.train.seed,
                                       name=name, eval_images=held_out, **kw)
        cpu, wall = time.process_time() - t0, time.perf_counter() - w0
        meta = json.loads((folder / "codec.json").read_text())
        tok = ImageTokenizer.from_pretrained(folder)
        ceiling, by_fact = facts(lambda x: tok.decode(tok.encode(x)), cfg)
    grid = cfg.data.resolution // tok.downsample
    return {"setting": name, "seed": cfg.train.seed, "downsample": tok.downsample, "tokens": f"{grid}x{grid}", "codebook": kw["codebook_size"],
            "code_dim": kw["latent_channels"], "channels": list(kw["channels"]), "steps": kw["steps"],
            "chroma_weight": kw["chroma_weight"], "restart_codes": kw["restart_codes"], "ema": kw["ema"],
            "psnr": meta["psnr"], "perplexity": meta["perplexity"], "codes_used": meta["codes_used"],
            "codes_restarted": meta["codes_restarted"], "ceiling": ceiling,
            **{f"fact_{k}": v for k, v in by_fact.items()},
            "cpu_s": round(cpu, 1), "wall_s": round(wall, 1), "cpu_over_vae_600": round(cpu / (600 * vae_step_cpu), 3),
            "est_idle_s": round(cpu / (600 * vae_step_cpu) * VAE_IDLE_SECONDS_PER_600, 1),
            "params": sum(p.numel() for p in tok.parameters()), "commit": commit()}


COLUMNS = ["setting", "tokens", "codebook", "code_dim", "steps", "ema", "psnr", "perplexity", "codes_used", "ceiling",
           "fact_colour", "fact_shape", "fact_count", "fact_size", "fact_relation", "est_idle_s", "cpu_s"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", default="4x-1024,8x-1024", help=f"comma-separated, of: {', '.join(SETTINGS)}")
    p.add_argument("--ref-steps", type=int, default=60, help="VAE steps timed for the CPU-seconds scale")
    p.add_argument("--seed", type=int, default=0, help="train.seed (a row named SETTING@SEED when not 0)")
    args = p.parse_args(argv)
    names = [s for s in args.settings.split(",") if s]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown:
        raise SystemExit(f"error: unknown settings {unknown}; choose from {list(SETTINGS)}")
    names = [f"{n}@{args.seed}" if args.seed else n for n in names]
    cfg = load_config(str(REPO / "configs" / "main.yaml"), ["codec.kind=vq", f"train.seed={args.seed}"])
    vae_step = vae_cpu_per_step(cfg, args.ref_steps)
    print(f"VAE reference: {vae_step:.3f} CPU s/step", flush=True)
    for name in names:
        row = {**run(name, cfg, vae_step), "vae_cpu_s_per_step": round(vae_step, 4)}
        print(json.dumps(row), flush=True)
        save_row(row, cfg)


def save_row(row: dict, cfg) -> None:
    """Add (or replace) ``row`` in the results, under a lock: several invocations may run side by side."""
    import fcntl

    path = RESULTS / "vq_tokenizer.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(Path(tempfile.gettempdir()) / "vq_tokenizer_results.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = {r["setting"]: {"ema": 0.0, **r}  # rows from before the ema option trained without it
                for r in (json.loads(path.read_text())["rows"] if path.exists() else [])}
        rows[row["setting"]] = row
        ordered = sorted(rows.values(), key=lambda r: (list(SETTINGS).index(r["setting"].split("@")[0]), r["setting"]))
        md = ["# Image tokenizer (Chameleon setting): small VQModel on shapes, 64 px", "{header}",
              __doc__.split("\n\n")[1], "", __doc__.split("\n\n")[2], "",
              f"Data: configs/main.yaml (max {cfg.data.shapes_max_shapes} shapes, "
              f"{'textured' if cfg.data.shapes_textured else 'plain'} backgrounds); PSNR and codebook usage on 64 "
              f"held-out val images; ceiling and facts on the {N_SCENES} held-out test scenes. Each row names the "
              f"commit it ran at in the json.", "", md_table(ordered, COLUMNS, digits=3), ""]
        write_results("vq_tokenizer", {"rows": ordered, "n_scenes": N_SCENES}, "\n".join(md))


if __name__ == "__main__":
    main()
