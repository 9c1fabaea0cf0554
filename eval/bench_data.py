"""Data pipeline throughput: examples/s of decode (or shapes rendering) -> crop -> encode or cached
latents -> tokenize -> pack, with 0 and 2 workers, against what the ``small`` training step consumes.

Goal (issue 5): with cached latents the loader delivers >= 3x the examples/s the step consumes.

    python eval/bench_data.py [--batches 20] [--flickr ../shared/assets/images/flickr8k-1000]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import REPO, bare_step, md_table, median_time, pipeline_stream, write_results

from transfusion_mot.config import load_config, replace
from transfusion_mot.data.pipeline import BatchStream, examples_per_batch

GOAL = 3.0


def stream_rate(cfg, run_dir: Path, batches: int, workers: int, warm_cache: bool) -> tuple[float, dict]:
    cfg = replace(cfg, data={"num_workers": workers})
    _, encode, source, specials = pipeline_stream(cfg, run_dir)
    if warm_cache:  # one pass over the same positions fills the latent cache
        warm = BatchStream(source, encode, cfg, specials)
        for _ in range(batches):
            next(warm)
    stream = BatchStream(source, encode, cfg, specials)
    next(stream)  # start-up (workers) is not throughput
    t0 = time.perf_counter()
    for _ in range(batches):
        next(stream)
    seconds = time.perf_counter() - t0
    stats = {"hits": getattr(encode, "hits", None), "misses": getattr(encode, "misses", None)}
    return batches * examples_per_batch(cfg) / seconds, stats


def step_rate(cfg, run_dir: Path) -> float:
    """Examples/s the small MoT training step consumes (forward, backward, AdamW)."""
    tokenizer, encode, source, specials = pipeline_stream(cfg, run_dir)
    batch = next(BatchStream(source, encode, cfg, specials))
    return examples_per_batch(cfg) / median_time(bare_step(cfg, [batch], tokenizer.vocab_size), reps=10, warmup=2)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--flickr", default=str(REPO.parent / "shared" / "assets" / "images" / "flickr8k-1000"))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    settings = {"shapes (64 px, trained VAE)": load_config(str(REPO / "configs" / "small_mot.yaml"), [])}
    if Path(args.flickr).is_dir():
        settings["flickr8k (128 px jpeg, TAEF2)"] = load_config(str(REPO / "configs" / "small_mot.yaml"), [
            "data.source=imagefolder", f"data.path={args.flickr}", "data.resolution=128", "codec.kind=taef2",
            f"codec.encoder_path={Path(args.flickr).parents[1] / 'vae' / 'taef2_encoder.pth'}",
            f"codec.decoder_path={Path(args.flickr).parents[1] / 'vae' / 'taef2_decoder.pth'}",
            "model.latent_channels=32", "model.latent_size=16"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in settings.items():
            consume = step_rate(cfg, Path(tmp) / "step")
            for workers in (0, 2):
                for cached in (False, True):
                    c = replace(cfg, data={"cache_latents": cached})
                    rate, stats = stream_rate(c, Path(tmp) / name.split()[0], args.batches, workers, cached)
                    rows.append({"data": name, "workers": workers, "cached_latents": cached,
                                 "examples_per_s": rate, "step_examples_per_s": consume,
                                 "loader_over_step": rate / consume, **stats})
                    print(rows[-1], flush=True)
    cached_rows = [r for r in rows if r["cached_latents"]]
    worst = min(max(r["loader_over_step"] for r in cached_rows if r["data"] == d) for d in settings)
    md = ["# Data pipeline throughput", "{header}",
          f"{args.batches} batches of the `small` layout per measurement; the step column is what one small MoT "
          f"training step (forward+backward+AdamW) consumes. Goal: loader >= {GOAL}x the step with cached latents "
          f"(best worker count per data set): worst data set **{worst:.2f}x** ({'met' if worst >= GOAL else 'not met'}).",
          "", md_table(rows)]
    write_results("bench_data", {"rows": rows, "goal": GOAL, "worst_cached_ratio": worst}, "\n".join(md) + "\n",
                  args.out)


if __name__ == "__main__":
    main()
