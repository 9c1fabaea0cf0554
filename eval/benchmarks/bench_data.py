"""Data at scale: start-up time and memory of the shard stream at 10k / 100k / 1M samples, throughput of the
pre-encoded latent path against what a small training step consumes (JPEG + VAE and the per-example latent
cache beside it), and the time to the first batch after a resume at 1M samples.

Goals (issue 20): start-up time and memory flat within 2x from 10k to 1M; encoded latents >= 10x the step's
consumption with 2 workers; first batch after a resume at 1M <= 5 s.

    python eval/benchmarks/bench_data.py [--tmp /tmp] [--sizes 10000 100000 1000000] [--flickr ../shared/assets/...]

The synthetic shards (1000 tiny JPEGs + captions each) go under --tmp and are deleted at the end.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # eval/: common.py, shared by every eval script
from common import REPO, bare_step, md_table, median_time, write_results

PER_SHARD = 1000
GOALS = {"startup_ratio": 2.0, "latents_over_step": 10.0, "resume_s": 5.0}


def write_synthetic(folder: Path, n: int) -> None:
    """``n // 1000`` shards; the first is written with webdataset's TarWriter, the rest are copies of it
    (the stream reads keys per shard, so identical shards cost what distinct ones do)."""
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    first = folder / "000000.tar"
    if not first.exists():
        with wds.TarWriter(str(first)) as sink:
            for i in range(PER_SHARD):
                buf = io.BytesIO()
                arr = np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)
                Image.fromarray(arr).save(buf, format="JPEG", quality=50)
                sink.write({"__key__": f"{i:06d}", "jpg": buf.getvalue(), "txt": f"a tiny noise image {i}"})
    for s in range(1, n // PER_SHARD):
        target = folder / f"{s:06d}.tar"
        if not target.exists():
            shutil.copyfile(first, target)


def synthetic_cfg(folder: Path, n: int, *extra: str):
    from transfusion_mot.config import load_config

    pattern = f"{folder}/{{000000..{n // PER_SHARD - 1:06d}}}.tar"
    return load_config(str(REPO / "configs" / "debug.yaml"), [
        "data.source=webdataset", f"data.path={pattern}", "data.val_fraction=0", "data.stream_lanes=64", *extra])


def _fake_encode(keys, pixels):  # (N, 3, 32, 32) -> the debug model's (N, 4, 8, 8): no VAE in the timing
    import torch

    pooled = torch.nn.functional.avg_pool2d(pixels, 4)
    return torch.cat([pooled, pooled[:, :1]], 1)


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def lane_state_at(plan, lane: int, consumed: int, starts: list[int]) -> list[int]:
    """(epoch, shard, offset, consumed, byte) of a lane that gave out ``consumed`` samples: what the stream
    saves there (every shard is a copy of the first, whose sample offsets are ``starts``)."""
    epoch, left = 0, consumed
    while left >= len(plan.shards(lane, epoch)) * PER_SHARD:
        left -= len(plan.shards(lane, epoch)) * PER_SHARD
        epoch += 1
    shard, offset = divmod(left, PER_SHARD)
    return [epoch, shard, offset, consumed, starts[offset - 1] if offset else 0]


def one_startup(folder: str, n: int, resume_at: float, workers: int) -> dict:
    """In a fresh process: build the training stream of ``n`` samples (from position ``resume_at * n`` with
    the lane state a run there saves) and time it to the first batch; memory is the peak over the imports."""
    from transfusion_mot.data.packing import Specials
    from transfusion_mot.data.pipeline import build_records, build_stream, prepare_tokenizer

    cfg = synthetic_cfg(Path(folder), n, f"data.num_workers={workers}")
    tok = prepare_tokenizer(cfg)
    state, start = None, 0
    if resume_at:  # the state a run saves at that position (made before the clock starts)
        state, start = saved_state(cfg, n, resume_at)
    base = _status_mib("VmRSS")
    t0 = time.perf_counter()
    records = build_records(cfg.data)
    stream = build_stream(records, tok, _fake_encode, cfg, Specials.of(tok), start=start, state=state,
                          report=lambda msg: None)
    batch = next(stream)
    seconds = time.perf_counter() - t0
    return {"seconds_to_first_batch": seconds, "peak_rss_mib": _status_mib("VmHWM") - base,
            "shards": len(records.shards), "images": batch.n_images, "start_batch": start}


def saved_state(cfg, n: int, resume_at: float) -> tuple[dict, int]:
    """(state, batch index) that the stream saves at ``resume_at * n`` (every shard holds PER_SHARD samples
    and is a copy of the first, so each lane's shard, offset and byte follow from its count)."""
    from transfusion_mot.data.pipeline import build_records, examples_per_batch
    from transfusion_mot.data.streaming import LanePlan, read_shard

    records = build_records(cfg.data)
    per = examples_per_batch(cfg)
    start = int(n * resume_at) // per
    plan = LanePlan(len(records.shards), cfg.data.stream_lanes, cfg.train.seed)
    starts = [sample["__offset__"] for sample in read_shard(records.shards[0])]
    lanes = [[lane, *lane_state_at(plan, lane, plan.consumed_before(lane, start * per), starts)]
             for lane in range(plan.lanes)]
    return {"kind": "shards", "source": records.name, "n_lanes": plan.lanes, "seed": plan.seed,
            "position": start * per, "lanes": lanes}, start


def startup(folder: Path, n: int, resume_at: float = 0.0, workers: int = 0) -> dict:
    res = subprocess.run([sys.executable, __file__, "--one", str(folder), str(n), str(resume_at), str(workers)],
                         capture_output=True, text=True, timeout=900)
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- throughput: latents vs JPEG + VAE vs the step
def flickr_cfg(flickr: Path, vae: Path, *extra: str):
    from transfusion_mot.config import load_config

    return load_config(str(REPO / "configs" / "small_mot.yaml"), [
        "data.source=imagefolder", f"data.path={flickr}", "data.resolution=128", "codec.kind=taef2",
        f"codec.encoder_path={vae / 'taef2_encoder.pth'}", f"codec.decoder_path={vae / 'taef2_decoder.pth'}",
        "model.latent_channels=32", "model.latent_size=16", *extra])


def rate(cfg, run_dir: Path, batches: int, warm: bool = False) -> float:
    """Examples/s of the training stream (as train.py builds it) after its first batch."""
    from transfusion_mot.data.packing import Specials
    from transfusion_mot.data.pipeline import build_records, build_stream, examples_per_batch, prepare_codec, prepare_tokenizer

    tok = prepare_tokenizer(cfg)
    records = build_records(cfg.data, "train")
    _, encode = prepare_codec(cfg, run_dir, records=records)

    def stream():
        return build_stream(records, tok, encode, cfg, Specials.of(tok), report=lambda msg: None)

    if warm:  # one pass over the same positions fills the per-example latent cache
        s = stream()
        for _ in range(batches + 1):
            next(s)
    s = stream()
    next(s)  # start-up (workers, lanes) is not throughput
    t0 = time.perf_counter()
    for _ in range(batches):
        next(s)
    return batches * examples_per_batch(cfg) / (time.perf_counter() - t0)


def step_rate(cfg, run_dir: Path) -> float:
    from transfusion_mot.data.packing import Specials
    from transfusion_mot.data.pipeline import build_records, build_stream, examples_per_batch, prepare_codec, prepare_tokenizer

    tok = prepare_tokenizer(cfg)
    records = build_records(cfg.data, "train")
    _, encode = prepare_codec(cfg, run_dir, records=records)
    batch = next(build_stream(records, tok, encode, cfg, Specials.of(tok), report=lambda msg: None))
    return examples_per_batch(cfg) / median_time(bare_step(cfg, [batch], tok.vocab_size), reps=10, warmup=2)


def subset(flickr: Path, out: Path, n: int) -> Path:
    """The first ``n`` Flickr8k images (links) with their captions: an image folder the throughput rows share."""
    from transfusion_mot.data.sources import ImageFolderSource

    out.mkdir(parents=True)
    rows = []
    for name, captions in ImageFolderSource(flickr).items[:n]:
        (out / name).symlink_to(flickr / name)
        rows += [json.dumps({"file_name": name, "text": c}) for c in captions]
    (out / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return out


def throughput(flickr: Path, tmp: Path, batches: int, n_images: int = 320) -> list[dict]:
    from transfusion_mot.data.encode import encode

    vae = flickr.parents[1] / "vae"  # TAEF2 beside the Flickr8k subset in shared/assets
    flickr = subset(flickr, tmp / "flickr-subset", n_images)
    latents = tmp / "flickr-latents"
    t0 = time.perf_counter()
    encode(flickr_cfg(flickr, vae), latents, shard_size=100, report=lambda msg: None)
    encode_s = time.perf_counter() - t0
    consume = step_rate(flickr_cfg(flickr, vae), tmp / "step")
    rows = []
    for workers in (0, 2):
        settings = {
            "encoded latent shards (data.source=latents)": (flickr_cfg(flickr, vae, "data.source=latents",
                                                                       f"data.path={latents}",
                                                                       "data.stream_lanes=8"), False),
            "JPEG + TAEF2 on the fly": (flickr_cfg(flickr, vae, "data.cache_latents=false"), False),
            "JPEG + per-example latent cache (warm)": (flickr_cfg(flickr, vae, "data.cache_latents=true"), True)}
        for name, (cfg, warm) in settings.items():
            cfg.data.num_workers = workers
            try:
                r = rate(cfg, tmp / "run", batches, warm)
            except Exception as e:  # one broken row must not lose the others' measurements
                rows.append({"path": name, "workers": workers, "error": f"{type(e).__name__}: {e}"[:300]})
                continue
            rows.append({"path": name, "workers": workers, "examples_per_s": r, "step_examples_per_s": consume,
                         "over_step": r / consume})
            print(rows[-1], flush=True)
    rows.append({"path": f"encode {n_images} Flickr8k images once (128 px, TAEF2, one process): {encode_s:.0f} s",
                 "workers": 0})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--tmp", default="/tmp")
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--images", type=int, default=320, help="Flickr8k images of the throughput rows")
    p.add_argument("--reps", type=int, default=3, help="fresh processes per start-up / resume measurement")
    p.add_argument("--flickr", default=str(REPO.parent / "shared" / "assets" / "images" / "flickr8k-1000"))
    p.add_argument("--out", default=None)
    p.add_argument("--one", nargs=4, help=argparse.SUPPRESS)  # internal: folder n resume_at workers
    args = p.parse_args(argv)
    if args.one:
        folder, n, resume_at, workers = args.one
        print(json.dumps(one_startup(folder, int(n), float(resume_at), int(workers))))
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench-data-", dir=args.tmp))
    try:
        t0 = time.perf_counter()
        write_synthetic(tmp / "shards", max(args.sizes))
        print(f"wrote {max(args.sizes)} samples in {time.perf_counter() - t0:.0f} s", flush=True)
        scale = []
        for n in sorted(args.sizes):
            for workers in (0, 2):  # median of --reps fresh processes: single runs move 2x on a busy machine
                runs = [startup(tmp / "shards", n, workers=workers) for _ in range(args.reps)]
                row = {"samples": n, "workers": workers, **runs[0]}
                for key in ("seconds_to_first_batch", "peak_rss_mib"):
                    row[key] = statistics.median(r[key] for r in runs)
                row["resume_s"] = statistics.median(startup(tmp / "shards", n, 0.75, workers)["seconds_to_first_batch"]
                                                    for _ in range(args.reps))
                scale.append(row)
                print(row, flush=True)
        flow = throughput(Path(args.flickr), tmp, args.batches, args.images) if Path(args.flickr).is_dir() else []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write(scale, flow, args)


def write(scale: list[dict], flow: list[dict], args) -> None:
    ratio = {k: max(max(r[k] for r in scale if r["workers"] == w) / min(r[k] for r in scale if r["workers"] == w)
                    for w in {r["workers"] for r in scale})
             for k in ("seconds_to_first_batch", "peak_rss_mib")}  # largest / smallest size, per worker count
    worst_resume = max(r["resume_s"] for r in scale if r["samples"] == max(args.sizes))
    best_latents = max((r["over_step"] for r in flow if r.get("workers") == 2 and "latent shards" in r["path"]),
                       default=float("nan"))
    verdict = {"startup_flat": max(ratio.values()) <= GOALS["startup_ratio"],
               "latents_headroom": best_latents >= GOALS["latents_over_step"],
               "resume_fast": worst_resume <= GOALS["resume_s"]}
    md = ["# Data at scale: start-up, throughput, resume", "{header}",
          f"Start-up = a fresh process builds the training stream (shard list, lanes, loader) and takes its first "
          f"batch of the debug layout from synthetic shards of {PER_SHARD} tiny JPEGs; memory = its peak resident "
          f"memory above the imports. Resume = the same from 75% of the data with the lane state a run saves there. "
          f"Median of {args.reps} fresh processes each.",
          "", md_table(scale), "",
          f"- start-up time max/min over the sizes (same worker count): **{ratio['seconds_to_first_batch']:.2f}x**, "
          f"memory **{ratio['peak_rss_mib']:.2f}x** (goal <= {GOALS['startup_ratio']}x): "
          f"{'met' if verdict['startup_flat'] else 'not met'}",
          f"- first batch after a resume at {max(args.sizes):,} samples: **{worst_resume:.2f} s** "
          f"(goal <= {GOALS['resume_s']} s): {'met' if verdict['resume_fast'] else 'not met'}", ""]
    if flow:
        md += [f"Throughput, `small` layout (8 rows, 128 px, TAEF2 32x16x16 latents), {args.batches} batches after "
               "the first; the step column is what one small MoT training step (forward+backward+AdamW) consumes.",
               f"The first {args.images} Flickr8k images, 5% held out.", "", md_table(flow), "",
               f"- encoded latents with 2 workers: **{best_latents:.1f}x** the step (goal >= "
               f"{GOALS['latents_over_step']}x): {'met' if verdict['latents_headroom'] else 'not met'}"]
    write_results("bench_data", {"scale": scale, "throughput": flow, "goals": GOALS, "ratios": ratio,
                                 "resume_s_at_max": worst_resume, "latents_over_step": best_latents,
                                 "verdict": verdict}, "\n".join(md) + "\n", args.out)


if __name__ == "__main__":
    main()
