"""GPU benchmark (issues 10, 19): training throughput and MFU of the paper's 163M and 760M sizes, MoT vs
dense, compiled blocks vs eager, flex attention vs SDPA with the dense boolean mask, and the time per image
of 250-step CFG sampling, at seq_len 4096 in bf16 autocast over fp32 master weights.

Training: flex attention with the Transfusion BlockMask, every block compiled as ``train.compile_blocks``
compiles it (compile on) or eager with flex compiled on its own (compile off), fused AdamW, a fixed
micro-batch per size (``ROWS``, halved on out-of-memory). MFU = model FLOPs per token
(``components/flops.py``: 6 per active weight + attention, the PaLM / MoT-paper count) x tokens/s / the
GPU's dense bf16 peak. The jobs run in order of importance against a time budget (``--budget-s``); a job
that would not fit is listed as skipped, and the results are rewritten after every job, so a run stopped
from outside still leaves what it measured.

    python eval/benchmarks/bench_gpu.py [--sizes 163M 760M] [--steps 10] [--budget-s 330] [--out eval/results]
    python eval/benchmarks/bench_gpu.py --dry-run --out DIR   # CPU, tiny sizes: every code path but CUDA's kernels

``eval/benchmarks/gpu_check.sh`` runs it after the GPU tests. Without CUDA and without ``--dry-run`` it says so and
writes nothing.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from transfusion_mot.components.flops import PAPER_TOKENIZER_VOCAB, size_data

RESULTS = Path(__file__).resolve().parents[1] / "results"
SEQ_LEN = 4096
ROWS = {"163M": 8, "760M": 4}  # micro-batch rows of SEQ_LEN tokens (halved on out-of-memory)
# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s; the first name contained in the device name wins.
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("B200", 2250.0),
               ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0), ("L4", 121.0)]
GOALS = {"mfu_760M_mot": (">=", 0.40), "mot_over_dense": ("<=", 1.05), "flex_speedup": (">=", 1.0)}
# The dry run: the same jobs at a CPU's scale (debug size, 2 rows of 256 tokens, dynamo without inductor).
DRY = dict(sizes=["debug"], seq_len=256, rows=2, steps=1, sample_steps=2, sample_batch=2, compile_backend="eager")
EST_S = {"compiled": 90.0, "eager": 25.0, "attention": 40.0, "sampling": 60.0}  # GPU seconds a job may need


class Bench:
    """The device, sizes and clock of one benchmark run."""

    def __init__(self, args):
        self.dry = args.dry_run
        self.device = "cpu" if self.dry else "cuda"
        self.seq_len = DRY["seq_len"] if self.dry else SEQ_LEN
        self.steps = DRY["steps"] if self.dry else args.steps
        self.sample_steps = DRY["sample_steps"] if self.dry else args.sample_steps
        self.sample_batch = DRY["sample_batch"] if self.dry else args.sample_batch
        self.backend = DRY["compile_backend"] if self.dry else args.compile_backend
        self.rows = args.rows
        self.warmup = 1 if self.dry else 2
        self.deadline = time.perf_counter() + args.budget_s

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def sync_time(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def rows_for(self, size: str) -> int:
        return self.rows or (DRY["rows"] if self.dry else ROWS.get(size, 4))

    def free(self) -> None:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


# ---------------------------------------------------------------- models and batches
def build(b: Bench, size: str, arch: str, attention: str = "flex", compiled: bool = True):
    from transfusion_mot.config import load_config
    from transfusion_mot.model import build_model
    from transfusion_mot.train import compile_blocks

    cfg = load_config(None, [f"model.size={size}", f"model.arch={arch}", f"model.attention={attention}",
                             f"data.seq_len={b.seq_len}", *size_data(size)])
    torch.manual_seed(0)
    model = build_model(cfg.model, PAPER_TOKENIZER_VOCAB).to(b.device)  # every id Llama 2 + our specials emit
    if compiled:
        compile_blocks(model, backend=b.backend)
    return model, cfg


def paper_batch(b: Bench, m, rows: int):
    """Rows of caption->image documents, half text and half image patches (paper sizes: 256-patch latents);
    ``m`` is the model's config."""
    from transfusion_mot.data.packing import Specials, pack
    from transfusion_mot.data.segments import Image, Text

    n_patches = (m.latent_size // m.patch_size) ** 2
    doc_len = 2 * n_patches
    g = torch.Generator().manual_seed(0)
    docs = [[Text(torch.randint(5, PAPER_TOKENIZER_VOCAB, (n_patches - 4,), generator=g).tolist()),
             Image(torch.randn(m.latent_channels, m.latent_size, m.latent_size, generator=g))]
            for _ in range(rows * (b.seq_len // doc_len))]
    batch = pack(docs, b.seq_len, Specials(bos=1, eos=2, pad=0, boi=3, eoi=4), patch_size=m.patch_size, n_rows=rows)
    return batch.to(b.device)


def timed_steps(b: Bench, model, opt, cfg, batch, steps: int, warmup: int = 2) -> tuple[float, float]:
    """(median seconds of one training step: forward, backward, AdamW; seconds of the first, compiling, step)."""
    from transfusion_mot import flow

    times = []
    for i in range(warmup + steps):
        start = b.sync_time()
        with torch.autocast(b.device, dtype=torch.bfloat16):
            loss = flow.loss_parts(model, batch, cfg.flow, seed=i).total(cfg.flow.loss_weight)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(b.sync_time() - start)
    return statistics.median(times[warmup:]), times[0]


# ---------------------------------------------------------------- jobs
def bench_training(b: Bench, size: str, arch: str, compiled: bool, attention: str, peak: float | None) -> dict:
    from transfusion_mot.components.flops import model_flops_per_token
    from transfusion_mot.components.optim import build_optimizer
    from transfusion_mot.data.packing import TEXT

    model, cfg = build(b, size, arch, attention, compiled)
    opt = build_optimizer(model, cfg.optim, fused=b.device == "cuda")
    rows = b.rows_for(size)
    while True:
        try:
            if b.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            batch = paper_batch(b, model.cfg, rows)
            step_s, first_s = timed_steps(b, model, opt, cfg, batch, b.steps, b.warmup)
            break
        except torch.cuda.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            b.free()
            if rows == 1:
                raise
            rows //= 2
    text_share = float(((batch.modality == TEXT) & (batch.doc_id >= 0)).float().mean())
    flops = model_flops_per_token(model.cfg, b.seq_len, training=True, text_fraction=text_share)
    tokens_s = rows * b.seq_len / step_s
    del model, opt, batch
    b.free()
    return {"size": size, "arch": arch, "compiled": compiled, "attention": attention, "rows": rows,
            "tokens_per_step": rows * b.seq_len, "step_ms": round(1000 * step_s, 2), "first_step_s": round(first_s, 1),
            "tokens_per_s": round(tokens_s), "model_flops_per_token": flops,
            "achieved_tflops": round(flops * tokens_s / 1e12, 3),
            "mfu": round(flops * tokens_s / (peak * 1e12), 4) if peak else None,
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if b.device == "cuda" else None}


def bench_attention(b: Bench, size: str, reps: int = 10) -> dict:
    """One attention call at seq_len, flex (BlockMask, compiled) vs SDPA with the dense boolean mask: forward +
    backward where this torch has flex's backward on the device (CUDA), forward only elsewhere (CPU)."""
    from torch.nn.attention.flex_attention import flex_attention

    from transfusion_mot.config import load_config
    from transfusion_mot.model.masks import flex_backward_runs, flex_block_mask, mask_from_batch

    cfg = load_config(None, [f"model.size={size}", f"data.seq_len={b.seq_len}", *size_data(size)])
    batch = paper_batch(b, cfg.model, 1)
    h, hd = cfg.model.n_heads, cfg.model.dim // cfg.model.n_heads
    backward = flex_backward_runs(b.device)
    q, k, v = (torch.randn(1, h, b.seq_len, hd, device=b.device, dtype=torch.bfloat16, requires_grad=backward)
               for _ in range(3))
    block_mask = flex_block_mask(batch.doc_id, batch.image_id)
    bool_mask = mask_from_batch(batch.doc_id, batch.image_id)
    flex = torch.compile(flex_attention, backend="inductor" if b.device == "cuda" else b.backend, fullgraph=True)
    kernels = {"flex": lambda: flex(q, k, v, block_mask=block_mask),
               "sdpa_bool_mask": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask)}
    out = {"size": size, "heads": h, "head_dim": hd, "seq_len": b.seq_len, "backward": backward,
           "mask_density": round(float(bool_mask.float().mean()), 4)}
    for name, fn in kernels.items():
        times = []
        for i in range(3 + (2 if b.dry else reps)):
            start = b.sync_time()
            with torch.set_grad_enabled(backward):
                y = fn()
                if backward:
                    y.float().sum().backward()
            times.append(b.sync_time() - start)
            q.grad = k.grad = v.grad = None
        out[f"{name}_ms"] = round(1000 * statistics.median(times[3:]), 3)
    out["flex_speedup"] = round(out["sdpa_bool_mask_ms"] / out["flex_ms"], 3)
    return out


def bench_sampling(b: Bench, size: str) -> dict:
    """Seconds per image of Euler sampling with CFG 4 (conditional and unconditional rows in one batch, the
    prompt's keys/values cached), eager blocks, bf16 autocast."""
    from transfusion_mot.data.packing import Specials
    from transfusion_mot.sample import generate_images

    model, cfg = build(b, size, "mot", compiled=False)
    n_patches = (cfg.model.latent_size // cfg.model.patch_size) ** 2
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, PAPER_TOKENIZER_VOCAB, (32,), generator=g).tolist() for _ in range(b.sample_batch)]
    specials = Specials(bos=1, eos=2, pad=0, boi=3, eoi=4)
    kwargs = dict(cfg_scale=4.0, seed=0, batch_size=b.sample_batch)
    with torch.autocast(b.device, dtype=torch.bfloat16):
        generate_images(model, prompts, specials, steps=2, **kwargs)  # warm up (compiles flex on CUDA)
        start = b.sync_time()
        images = generate_images(model, prompts, specials, steps=b.sample_steps, **kwargs)
        seconds = b.sync_time() - start
    del model
    b.free()
    return {"size": size, "arch": "mot", "steps": b.sample_steps, "cfg_scale": 4.0, "batch_size": b.sample_batch,
            "latent_patches": n_patches, "prompt_tokens": 32, "images": int(images.shape[0]),
            "seconds": round(seconds, 2), "s_per_image": round(seconds / images.shape[0], 3)}


def plan(sizes: list[str]) -> list[tuple]:
    """Jobs in order of importance: the compiled flex training of each size (MoT, dense), flex vs SDPA,
    sampling, compile off, then SDPA inside the compiled MoT."""
    jobs = []
    for i, size in enumerate(sizes):
        jobs += [("train", size, "mot", True, "flex"), ("train", size, "dense", True, "flex")]
        if i == 0:
            jobs.append(("attention", sizes[-1]))
        jobs.append(("sampling", size))
    for size in sizes:
        jobs += [("train", size, "mot", False, "flex"), ("train", size, "dense", False, "flex")]
    jobs.append(("train", sizes[0], "mot", True, "sdpa"))
    return jobs


def estimate(b: Bench, job: tuple) -> float:
    if b.dry:
        return 0.0
    if job[0] == "train":
        return EST_S["compiled" if job[3] else "eager"] * (2 if job[1] != "163M" else 1)
    return EST_S[job[0]]


def run_jobs(b: Bench, sizes: list[str], peak: float | None, on_result) -> dict:
    results = {"training": [], "attention": None, "sampling": [], "skipped": []}
    for job in plan(sizes):
        if b.left() < estimate(b, job):
            results["skipped"].append({"job": list(job), "why": f"time budget ({b.left():.0f} s left)"})
            continue
        try:
            if job[0] == "train":
                results["training"].append(bench_training(b, *job[1:], peak))
            elif job[0] == "attention":
                results["attention"] = bench_attention(b, job[1])
            else:
                results["sampling"].append(bench_sampling(b, job[1]))
        except Exception as e:  # one failing job (a kernel, out of memory) is reported, the others still run
            results["skipped"].append({"job": list(job), "why": f"{type(e).__name__}: {str(e)[:300]}"})
            b.free()
        on_result(results)
    return results


# ---------------------------------------------------------------- report
def ratios(training: list[dict]) -> None:
    """MoT step time over dense's, at the same size, compile setting and attention (equal FLOPs/token)."""
    for r in training:
        twin = next((d for d in training if d["arch"] == "dense" and r["arch"] == "mot" and
                     (d["size"], d["compiled"], d["attention"]) == (r["size"], r["compiled"], r["attention"])), None)
        if twin is not None and twin["rows"] == r["rows"]:
            r["mot_over_dense"] = round(r["step_ms"] / twin["step_ms"], 4)


def goals(training: list[dict], attention: dict | None) -> dict:
    values = {}
    for r in training:
        if (r["size"], r["arch"], r["compiled"], r["attention"]) == ("760M", "mot", True, "flex") and r["mfu"]:
            values["mfu_760M_mot"] = r["mfu"]
        if "mot_over_dense" in r and r["compiled"] and r["attention"] == "flex":
            values[f"mot_over_dense_{r['size']}"] = r["mot_over_dense"]
    if attention:
        values["flex_speedup"] = attention["flex_speedup"]
    out = {}
    for name, value in values.items():
        op, target = GOALS[name if name in GOALS else "mot_over_dense"]
        out[name] = {"value": value, "goal": f"{op} {target}", "pass": value >= target if op == ">=" else value <= target}
    return out


def markdown(payload: dict) -> str:
    m = payload["machine"]
    title = (f"# GPU benchmark: dry run on {m['device']} (tiny sizes, no CUDA kernels; not a measurement)"
             if payload["dry_run"] else f"# GPU benchmark on {m['device']}")
    lines = [title, "", f"Command: `{payload['command']}`  ", f"Commit: `{m['commit']}`  ",
             f"torch {m['torch']}, CUDA {m['cuda']}, bf16 peak {m['peak_tflops']} TFLOP/s, seq_len {m['seq_len']}, "
             f"compile backend {m['compile_backend']}", "",
             "## Training (bf16 autocast, fused AdamW)", "",
             "| size | arch | compiled | attention | micro-batch | step ms | first step s | tokens/s | TFLOP/s | MFU "
             "| peak mem GiB | MoT/dense |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["training"]:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        lines.append(f"| {r['size']} | {r['arch']} | {'on' if r['compiled'] else 'off'} | {r['attention']} | "
                     f"{r['rows']} x {m['seq_len']} | {r['step_ms']:.1f} | {r['first_step_s']} | {r['tokens_per_s']:,} | "
                     f"{r['achieved_tflops']} | {mfu} | {r['peak_memory_gib'] or 'n/a'} | {r.get('mot_over_dense', '')} |")
    a = payload.get("attention")
    if a:
        lines += ["", f"## Attention at {a['seq_len']} ({a['size']}: {a['heads']} heads x {a['head_dim']}, mask "
                  f"density {a['mask_density']}, {'forward + backward' if a['backward'] else 'forward only'})", "",
                  f"flex (BlockMask) {a['flex_ms']} ms vs SDPA with the dense boolean mask {a['sdpa_bool_mask_ms']} ms: "
                  f"{a['flex_speedup']}x"]
    lines += ["", "## Sampling (Euler, CFG 4, cached prompt, eager blocks)", ""]
    for s in payload["sampling"]:
        lines.append(f"- {s['size']}: {s['s_per_image']} s per image at {s['steps']} steps "
                     f"({s['images']} images of {s['latent_patches']} patches in {s['seconds']} s, batch {s['batch_size']})")
    if payload["skipped"]:
        lines += ["", "## Not run", ""] + [f"- {' '.join(map(str, s['job']))}: {s['why']}" for s in payload["skipped"]]
    lines += ["", "## Goals", "", "| goal | value | target | result |", "|---|---|---|---|"]
    for name, g in payload["goals"].items():
        lines.append(f"| {name} | {g['value']} | {g['goal']} | {'pass' if g['pass'] else 'FAIL'} |")
    tests = payload.get("tests")
    if tests:
        lines += ["", "## GPU tests", "", f"`{tests['command']}`: {tests['summary']}"]
    return "\n".join(lines) + "\n"


def write(payload: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_gpu.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "bench_gpu.md").write_text(markdown(payload))


def machine(b: Bench, peak: float | None) -> dict:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    device = torch.cuda.get_device_name() if b.device == "cuda" else "CPU"
    return {"device": device, "gpu": device if b.device == "cuda" else None, "peak_tflops": peak,
            "torch": torch.__version__, "cuda": torch.version.cuda, "commit": commit, "seq_len": b.seq_len,
            "compile_backend": b.backend}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=["163M", "760M"])
    p.add_argument("--steps", type=int, default=10, help="timed training steps (median)")
    p.add_argument("--rows", type=int, default=None, help="micro-batch rows for every size (default: ROWS)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of this GPU, TFLOP/s")
    p.add_argument("--sample-steps", type=int, default=250)
    p.add_argument("--sample-batch", type=int, default=16)
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--budget-s", type=float, default=330.0, help="stop starting jobs that would not fit in this")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: every code path but CUDA's kernels")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU; none is visible here, so nothing was measured or written "
              "(--dry-run runs it on the CPU at tiny sizes).")
        return
    b = Bench(args)
    sizes = DRY["sizes"] if b.dry else args.sizes
    peak = None if b.dry else peak_tflops(torch.cuda.get_device_name(), args.peak_tflops)
    if not b.dry:
        torch.backends.cuda.matmul.allow_tf32 = True
        if peak is None:
            print(f"no known bf16 peak for {torch.cuda.get_device_name()!r}: MFU is left empty (pass --peak-tflops)")
    command = "python eval/benchmarks/bench_gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
    info = machine(b, peak)

    def on_result(results: dict) -> None:
        ratios(results["training"])
        payload = {"benchmark": "bench_gpu", "command": command, "dry_run": b.dry, "machine": info, **results,
                   "goals": goals(results["training"], results["attention"])}
        write(payload, args.out)
        done = len(results["training"]) + len(results["sampling"]) + (results["attention"] is not None)
        print(f"bench_gpu: {done} jobs done, {len(results['skipped'])} not run, {b.left():.0f} s of the budget left",
              flush=True)

    run_jobs(b, sizes, peak, on_result)
    print(f"wrote {args.out / 'bench_gpu.json'} and .md")


if __name__ == "__main__":
    main()
