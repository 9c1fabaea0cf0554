"""Which streaming library reads the shards: start-up time, resident memory and exact resume of each
candidate on the same synthetic samples (tiny JPEG + caption), every measurement in a fresh process.

Candidates: webdataset (what the package uses: its shard opener and tar iterator under our resumable
lanes), wids (webdataset's indexed, map-style shards), mosaicml-streaming (MDS shards), litdata (its own
chunks) and torchdata's StatefulDataLoader around a plain webdataset pipeline. The last four are not
dependencies of the package: install them in a separate environment to run this script

    python -m venv /tmp/libvenv && /tmp/libvenv/bin/pip install mosaicml-streaming litdata torchdata wids
    PYTHONPATH=. /tmp/libvenv/bin/python eval/benchmarks/bench_stream_libs.py --sizes 10000 100000
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PER_SHARD = 1000
RESUME_AT = 0.75  # resume at this fraction of the samples


def tiny_jpeg(seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write_tars(folder: Path, n: int) -> list[str]:
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    jpgs = [tiny_jpeg(i) for i in range(16)]
    urls = []
    for s in range(n // PER_SHARD):
        url = str(folder / f"{s:06d}.tar")
        with wds.TarWriter(url) as sink:
            for i in range(PER_SHARD):
                k = s * PER_SHARD + i
                sink.write({"__key__": f"{k:09d}", "jpg": jpgs[k % 16], "txt": f"caption {k}"})
        urls.append(url)
    return urls


# ------------------------------------------------------------------ one measurement per fresh process
def run_webdataset_lanes(folder: str, n: int, resume: int) -> dict:
    from transfusion_mot.data.sources import SkipStats
    from transfusion_mot.data.streaming import (LanePlan, LaneState, ShardSource, expand_shards, lane_samples,
                                                read_shard)

    t0 = time.perf_counter()
    source = ShardSource(expand_shards(folder))
    plan = LanePlan(len(source.shards), 64, seed=0)
    next(lane_samples(source, plan, 0, LaneState(), SkipStats()))
    start = time.perf_counter() - t0
    # resume: lane 0 has consumed resume // 64 samples; its state says where (epoch 0, shard, offset)
    consumed = resume // plan.lanes
    shard, offset = divmod(consumed, PER_SHARD)
    starts = [s["__offset__"] for s in read_shard(source.shards[0])]
    byte = starts[offset - 1] if offset else 0  # what the lane state saves
    t0 = time.perf_counter()
    sample, _, _ = next(lane_samples(ShardSource(expand_shards(folder)), LanePlan(len(source.shards), 64, 0), 0,
                                     LaneState(0, shard, offset, consumed, byte), SkipStats()))
    return {"startup_s": start, "resume_s": time.perf_counter() - t0, "exact_resume": "yes (lane states)",
            "check": sample["__key__"]}


def run_wids(folder: str, n: int, resume: int) -> dict:
    import wids

    t0 = time.perf_counter()
    shards = [{"url": str(p), "nsamples": PER_SHARD} for p in sorted(Path(folder).glob("*.tar"))]
    ds = wids.ShardListDataset(shards, keep=True)
    sampler = wids.DistributedChunkedSampler(ds, num_replicas=1, rank=0, shuffle=True)
    order = iter(sampler)
    ds[next(order)]
    start = time.perf_counter() - t0
    t0 = time.perf_counter()
    ds[resume]  # map-style: resume is an index (the sampler's order is a function of seed and epoch)
    return {"startup_s": start, "resume_s": time.perf_counter() - t0, "exact_resume": "yes (map-style index)"}


def run_streaming(folder: str, n: int, resume: int) -> dict:
    from streaming import StreamingDataLoader, StreamingDataset

    mds = Path(folder + "-mds")
    t0 = time.perf_counter()
    ds = StreamingDataset(local=str(mds), shuffle=True, batch_size=1, shuffle_seed=0)
    loader = StreamingDataLoader(ds, batch_size=1, num_workers=0)
    next(iter(loader))
    start = time.perf_counter() - t0
    state = {"epoch": 0, "sample_in_epoch": resume, "num_canonical_nodes": ds.num_canonical_nodes,
             "shuffle_seed": 0, "initial_physical_nodes": 1}
    t0 = time.perf_counter()
    ds2 = StreamingDataset(local=str(mds), shuffle=True, batch_size=1, shuffle_seed=0)
    loader2 = StreamingDataLoader(ds2, batch_size=1, num_workers=0)
    loader2.load_state_dict(state)
    next(iter(loader2))
    return {"startup_s": start, "resume_s": time.perf_counter() - t0,
            "exact_resume": "yes (sample_in_epoch; elastic over canonical nodes)"}


def run_litdata(folder: str, n: int, resume: int) -> dict:
    from litdata import StreamingDataLoader, StreamingDataset

    out = Path(folder + "-litdata")
    t0 = time.perf_counter()
    ds = StreamingDataset(str(out), shuffle=True, seed=0)
    loader = StreamingDataLoader(ds, batch_size=1, num_workers=0)
    it = iter(loader)
    next(it)
    start = time.perf_counter() - t0
    for _ in range(99):
        next(it)
    state = loader.state_dict()
    t0 = time.perf_counter()
    ds2 = StreamingDataset(str(out), shuffle=True, seed=0)
    loader2 = StreamingDataLoader(ds2, batch_size=1, num_workers=0)
    loader2.load_state_dict(state)
    next(iter(loader2))
    return {"startup_s": start, "resume_s": time.perf_counter() - t0,
            "exact_resume": "yes (loader state; resumed after 100 samples here)"}


def run_stateful_wds(folder: str, n: int, resume: int) -> dict:
    import webdataset as wds
    from torchdata.stateful_dataloader import StatefulDataLoader

    urls = [str(p) for p in sorted(Path(folder).glob("*.tar"))]
    t0 = time.perf_counter()
    loader = StatefulDataLoader(wds.WebDataset(urls, shardshuffle=False), batch_size=None, num_workers=0)
    it = iter(loader)
    next(it)
    start = time.perf_counter() - t0
    for _ in range(resume - 1):
        next(it)
    state = loader.state_dict()
    t0 = time.perf_counter()
    loader2 = StatefulDataLoader(wds.WebDataset(urls, shardshuffle=False), batch_size=None, num_workers=0)
    loader2.load_state_dict(state)
    next(iter(loader2))
    return {"startup_s": start, "resume_s": time.perf_counter() - t0,
            "exact_resume": "by replay: the dataset has no state, the loader re-reads every sample before it"}


RUNNERS = {"webdataset (lanes, ours)": run_webdataset_lanes, "wids": run_wids,
           "mosaicml-streaming": run_streaming, "litdata": run_litdata,
           "torchdata StatefulDataLoader + webdataset": run_stateful_wds}


def convert(folder: Path, n: int) -> dict:
    """The MDS and litdata copies of the tar shards (those libraries read their own formats only)."""
    import webdataset as wds

    seconds = {}
    samples = lambda: wds.WebDataset(sorted(str(p) for p in folder.glob("*.tar")), shardshuffle=False)  # noqa: E731
    try:
        from streaming import MDSWriter

        t0 = time.perf_counter()
        with MDSWriter(out=str(folder) + "-mds", columns={"jpg": "bytes", "txt": "str"}, size_limit=1 << 22) as w:
            for s in samples():
                w.write({"jpg": s["jpg"], "txt": s["txt"].decode()})
        seconds["mosaicml-streaming"] = time.perf_counter() - t0
    except ImportError:
        pass
    try:
        import litdata

        t0 = time.perf_counter()
        litdata.optimize(fn=_litdata_item, inputs=sorted(str(p) for p in folder.glob("*.tar")),
                         output_dir=str(folder) + "-litdata", chunk_bytes="4MB", num_workers=1)
        seconds["litdata"] = time.perf_counter() - t0
    except ImportError:
        pass
    return seconds


def _litdata_item(url: str):
    import webdataset as wds

    for s in wds.WebDataset(url, shardshuffle=False):
        yield {"jpg": s["jpg"], "txt": s["txt"].decode()}


def _status_mib(field: str) -> float:
    """A memory line of /proc/self/status in MiB (VmRSS: now, VmHWM: the peak so far)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--libs", nargs="+", default=list(RUNNERS), help="a subset of: " + ", ".join(RUNNERS))
    p.add_argument("--one", nargs=4, help=argparse.SUPPRESS)  # internal: library folder n resume
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results" / "bench_stream_libs.json"))
    args = p.parse_args(argv)
    if args.one:
        import torch  # noqa: F401  (every candidate imports it: not part of the difference)

        name, folder, n, resume = args.one
        base = _status_mib("VmRSS")
        row = RUNNERS[name](folder, int(n), int(resume))
        row["peak_rss_over_torch_mib"] = _status_mib("VmHWM") - base
        print(json.dumps(row))
        return
    rows = []
    for n in args.sizes:
        tmp = Path(tempfile.mkdtemp(prefix="stream-libs-"))
        try:
            folder = tmp / "tars"
            write_tars(folder, n)
            conversion = convert(folder, n) if set(args.libs) & {"mosaicml-streaming", "litdata"} else {}
            for name in args.libs:
                res = subprocess.run([sys.executable, __file__, "--one", name, str(folder), str(n),
                                      str(int(n * RESUME_AT))], capture_output=True, text=True, timeout=1800)
                row = {"library": name, "samples": n, "convert_s": conversion.get(name)}
                if res.returncode == 0:
                    row.update(json.loads(res.stdout.strip().splitlines()[-1]))
                else:
                    row["error"] = res.stderr.strip().splitlines()[-1][:200] if res.stderr.strip() else "failed"
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
