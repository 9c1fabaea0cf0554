"""Training throughput through the real loop (data, optimizer, EMA, logging) against the bare model
step on the same batches: tokens/s and peak memory of the ``small`` MoT and dense configs.

Goal (issue 6): bare-step tokens/s / loop tokens/s <= 1.10, i.e. the loop adds at most 10%.
A first, untimed run of the loop fills the on-disk latent cache for every step that is timed (the archs
share data and VAE), so the timed loops measure the loop, not the VAE encoder meeting new scenes.
Peak memory on CPU is the process's peak resident set size (ru_maxrss); on CUDA, max allocated.

    python eval/benchmarks/bench_train.py [--steps 60] [--log-every 10]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
from pathlib import Path

import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # eval/: common.py, shared by every eval script
from common import REPO, bare_step, md_table, median_time, pipeline_stream, write_results

from transfusion_mot.config import load_config
from transfusion_mot.data.pipeline import BatchStream
from transfusion_mot.train import train

GOAL = 1.10


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def loop_rate(cfg) -> float:
    """Median tokens/s over the logged intervals after the first (warm-up) one."""
    train(cfg, evaluate_at_end=False)
    rows = [json.loads(x) for x in (Path(cfg.train.out_dir) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]
    return statistics.median(rates)


def bare_rate(cfg, reps: int) -> float:
    """The model step alone: forward, backward, AdamW on pre-built batches from the same pipeline."""
    tokenizer, encode, source, specials = pipeline_stream(cfg, Path(cfg.train.out_dir))
    stream = BatchStream(source, encode, cfg, specials)
    batches = [next(stream) for _ in range(4)]
    seconds = median_time(bare_step(cfg, batches, tokenizer.vocab_size), reps=reps, warmup=3)
    tokens = sum(int((b.doc_id >= 0).sum()) for b in batches) / len(batches)
    return tokens / seconds


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--archs", nargs="+", default=["mot", "dense"])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = []

    def config(arch: str, out_dir: str):
        return load_config(str(REPO / "configs" / f"small_{arch}.yaml"),
                           [f"train.out_dir={out_dir}", f"train.steps={args.steps}", f"train.log_every={args.log_every}",
                            "train.save_every=0", "train.ema_decay=0.995"])

    with tempfile.TemporaryDirectory() as tmp:  # untimed: fills the latent cache for the timed steps
        train(config(args.archs[0], tmp), evaluate_at_end=False)
    for arch in args.archs:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = config(arch, tmp)
            loop = loop_rate(cfg)
            bare = bare_rate(cfg, reps=max(10, args.log_every))
            rows.append({"arch": arch, "loop_tokens_per_s": loop, "bare_tokens_per_s": bare,
                         "bare_over_loop": bare / loop, "peak_memory_mb": peak_memory_mb()})
            print(rows[-1], flush=True)
    worst = max(r["bare_over_loop"] for r in rows)
    md = ["# Training loop overhead (small size)", "{header}",
          f"{args.steps} steps of the real loop (batches from the shapes pipeline with latents cached by an untimed "
          f"first run, AdamW, EMA, "
          f"metrics every {args.log_every} steps), tokens/s = median over logged intervals after the first; bare = "
          f"forward+backward+AdamW of the same model on batches from the same pipeline. Goal bare/loop <= {GOAL}: "
          f"worst **{worst:.3f}** ({'met' if worst <= GOAL else 'not met'}). Peak memory: process peak RSS on CPU "
          "(cumulative over the script), max allocated on CUDA.", "", md_table(rows)]
    write_results("bench_train", {"rows": rows, "goal": GOAL, "worst": worst}, "\n".join(md) + "\n", args.out)


if __name__ == "__main__":
    main()
