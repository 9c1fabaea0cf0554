"""GPU benchmark (issue 10): training throughput and MFU of the paper's 163M and 760M sizes, MoT vs
dense, flex attention vs SDPA with a boolean mask, and 250-step image sampling throughput.

Training setup: seq_len 4096, bf16 autocast over fp32 master weights, ``torch.compile`` of every
block, flex attention with the Transfusion BlockMask, fused AdamW; the micro-batch is the largest
power of two that fits. MFU = model FLOPs per token (``components/flops.py``: 6 per active weight +
12·L·D·T attention, the PaLM / MoT-paper count) x tokens/s / the GPU's dense bf16 peak.

    python eval/bench_gpu.py [--sizes 163M 760M] [--peak-tflops 989] [--steps 10]

On a machine without CUDA it prints why and exits 0 without writing results.
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

RESULTS = Path(__file__).resolve().parent / "results"
SEQ_LEN = 4096
# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s; the first name contained in the device name wins.
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("B200", 2250.0),
               ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0), ("L4", 121.0)]
GOALS = {"mfu_760M_mot": (">=", 0.45), "mot_over_dense": ("<=", 1.05), "flex_speedup": (">=", 2.0)}


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def sync_time() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


# ---------------------------------------------------------------- training throughput
def build(size: str, arch: str):
    from transfusion_mot.components.flops import PAPER_TOKENIZER_VOCAB, size_data
    from transfusion_mot.config import load_config
    from transfusion_mot.model import build_model

    cfg = load_config(None, [f"model.size={size}", f"model.arch={arch}", "model.attention=flex",
                             f"data.seq_len={SEQ_LEN}", *size_data(size)])
    model = build_model(cfg.model, PAPER_TOKENIZER_VOCAB).cuda()  # the paper configs' Llama 2 vocabulary
    for block in model.backbone.blocks:
        block.compile()
    return model, cfg


def paper_batch(cfg, rows: int):
    """Rows of caption->image documents, half text and half image patches (256-patch latents)."""
    from transfusion_mot.components.flops import PAPER_TOKENIZER_VOCAB  # every id Llama 2 + our specials emit
    from transfusion_mot.data.packing import Specials, pack
    from transfusion_mot.data.segments import Image, Text

    m = cfg.model
    n_patches = (m.latent_size // m.patch_size) ** 2
    doc_len = 2 * n_patches
    g = torch.Generator().manual_seed(0)
    docs = [[Text(torch.randint(5, PAPER_TOKENIZER_VOCAB, (n_patches - 4,), generator=g).tolist()),
             Image(torch.randn(m.latent_channels, m.latent_size, m.latent_size, generator=g))]
            for _ in range(rows * (SEQ_LEN // doc_len))]
    batch = pack(docs, SEQ_LEN, Specials(bos=1, eos=2, pad=0, boi=3, eoi=4), patch_size=m.patch_size, n_rows=rows)
    return batch.to("cuda")


def timed_steps(model, opt, cfg, batch, steps: int, warmup: int = 3) -> float:
    """Median seconds of one full training step (forward, backward, AdamW)."""
    from transfusion_mot import flow

    times = []
    for i in range(warmup + steps):
        start = sync_time()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = flow.loss_parts(model, batch, cfg.flow, seed=i).total(cfg.flow.loss_weight)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(sync_time() - start)
    return statistics.median(times)


def fits(model, opt, cfg, rows: int) -> bool:
    try:
        timed_steps(model, opt, cfg, paper_batch(cfg, rows), steps=1, warmup=1)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        opt.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()


def largest_rows(model, opt, cfg, limit: int) -> int:
    """Largest power-of-two micro-batch (rows of 4096 tokens) that trains without running out of memory."""
    rows, candidate = 0, 1
    while candidate <= limit and fits(model, opt, cfg, candidate):
        rows, candidate = candidate, 2 * candidate
    if rows == 0:
        raise RuntimeError(f"{cfg.model.size} {cfg.model.arch}: not even one row of {SEQ_LEN} tokens fits")
    return rows


def bench_training(size: str, arch: str, steps: int, peak: float | None, rows: int | None,
                   max_rows: int) -> dict:
    from transfusion_mot.components.flops import model_flops_per_token
    from transfusion_mot.components.optim import build_optimizer
    from transfusion_mot.data.packing import TEXT

    model, cfg = build(size, arch)
    opt = build_optimizer(model, cfg.optim, fused=True)
    rows = rows or largest_rows(model, opt, cfg, max_rows)
    batch = paper_batch(cfg, rows)
    torch.cuda.reset_peak_memory_stats()
    step_s = timed_steps(model, opt, cfg, batch, steps)
    text_share = float(((batch.modality == TEXT) & (batch.doc_id >= 0)).float().mean())
    flops = model_flops_per_token(model.cfg, SEQ_LEN, training=True, text_fraction=text_share)
    tokens_s = rows * SEQ_LEN / step_s
    out = {"size": size, "arch": arch, "rows": rows, "tokens_per_step": rows * SEQ_LEN,
           "step_ms": round(1000 * step_s, 2), "tokens_per_s": round(tokens_s),
           "model_flops_per_token": flops, "achieved_tflops": round(flops * tokens_s / 1e12, 1),
           "mfu": round(flops * tokens_s / (peak * 1e12), 4) if peak else None,
           "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2),
           "_model": model, "_opt": opt, "_cfg": cfg}
    return out


def time_at(result: dict, rows: int, steps: int) -> float:
    """Step seconds of an already built model at another micro-batch (equal-batch MoT/dense ratio)."""
    return timed_steps(result["_model"], result["_opt"], result["_cfg"], paper_batch(result["_cfg"], rows), steps)


def release(result: dict) -> None:
    for key in ("_model", "_opt", "_cfg"):
        result.pop(key, None)
    gc.collect()
    torch.cuda.empty_cache()


# ---------------------------------------------------------------- attention kernels
def bench_attention(size: str, rows: int, reps: int = 10) -> dict:
    """Forward + backward of one attention call at 4096: flex (BlockMask) vs SDPA (dense boolean mask)."""
    from torch.nn.attention.flex_attention import flex_attention

    from transfusion_mot.components.flops import size_data
    from transfusion_mot.config import load_config
    from transfusion_mot.model.masks import flex_block_mask, mask_from_batch

    cfg = load_config(None, [f"model.size={size}", f"data.seq_len={SEQ_LEN}", *size_data(size)])
    batch = paper_batch(cfg, rows)
    h, hd = cfg.model.n_heads, cfg.model.dim // cfg.model.n_heads
    q, k, v = (torch.randn(rows, h, SEQ_LEN, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    block_mask = flex_block_mask(batch.doc_id, batch.image_id)
    bool_mask = mask_from_batch(batch.doc_id, batch.image_id)
    flex = torch.compile(flex_attention, fullgraph=True)
    kernels = {
        "flex": lambda: flex(q, k, v, block_mask=block_mask),
        "sdpa_bool_mask": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask),
    }
    out = {"size": size, "rows": rows, "heads": h, "head_dim": hd,
           "mask_density": round(float(bool_mask.float().mean()), 4)}
    for name, fn in kernels.items():
        times = []
        for i in range(3 + reps):
            start = sync_time()
            fn().float().sum().backward()
            if i >= 3:
                times.append(sync_time() - start)
            q.grad = k.grad = v.grad = None
        out[f"{name}_ms"] = round(1000 * statistics.median(times), 3)
    out["flex_speedup"] = round(out["sdpa_bool_mask_ms"] / out["flex_ms"], 3)
    return out


# ---------------------------------------------------------------- sampling
def bench_sampling(size: str, batch_size: int, steps: int | None = None) -> dict:
    """Images/s of Euler sampling at the default steps and CFG (``SampleConfig``: 250, 4) with the
    prompt's KV cache reused every step."""
    try:
        from transfusion_mot.sample import generate_images
    except ImportError as err:
        return {"size": size, "error": f"transfusion_mot.sample.generate_images unavailable: {err}"}
    from transfusion_mot.components.flops import PAPER_TOKENIZER_VOCAB
    from transfusion_mot.config import SampleConfig
    from transfusion_mot.data.packing import Specials

    model, cfg = build(size, "mot")
    n_patches = (cfg.model.latent_size // cfg.model.patch_size) ** 2
    prompts = [torch.randint(5, PAPER_TOKENIZER_VOCAB, (32,)).tolist() for _ in range(batch_size)]
    specials = Specials(bos=1, eos=2, pad=0, boi=3, eoi=4)
    steps, cfg_scale = steps or SampleConfig.steps, SampleConfig.cfg_scale
    kwargs = dict(steps=steps, cfg_scale=cfg_scale, seed=0, batch_size=batch_size)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        generate_images(model, prompts[:1], specials, **{**kwargs, "steps": 2})  # compile / warm up
        start = sync_time()
        images = generate_images(model, prompts, specials, **kwargs)
        seconds = sync_time() - start
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {"size": size, "arch": "mot", "steps": steps, "cfg_scale": cfg_scale, "batch_size": batch_size,
            "latent_patches": n_patches, "prompt_tokens": 32, "images": int(images.shape[0]),
            "seconds": round(seconds, 2), "images_per_s": round(images.shape[0] / seconds, 3)}


# ---------------------------------------------------------------- report
def goals(training: list[dict], attention: dict | None) -> dict:
    values = {}
    for r in training:
        if r["size"] == "760M" and r["arch"] == "mot" and r["mfu"] is not None:
            values["mfu_760M_mot"] = r["mfu"]
        if "mot_over_dense" in r:
            values[f"mot_over_dense_{r['size']}"] = r["mot_over_dense"]
    if attention:
        values["flex_speedup"] = attention["flex_speedup"]
    out = {}
    for name, value in values.items():
        op, target = GOALS[name if name in GOALS else "mot_over_dense"]
        ok = value >= target if op == ">=" else value <= target
        out[name] = {"value": value, "goal": f"{op} {target}", "pass": ok}
    return out


def write(payload: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_gpu.json").write_text(json.dumps(payload, indent=2) + "\n")
    m = payload["machine"]
    lines = [f"# GPU benchmark on {m['gpu']}", "", f"Command: `{payload['command']}`  ",
             f"Commit: `{m['commit']}`  ", f"torch {m['torch']}, CUDA {m['cuda']}, peak bf16 {m['peak_tflops']} TFLOP/s",
             "", "## Training (seq_len 4096, bf16 autocast, compiled blocks, flex attention, fused AdamW)", "",
             "| size | arch | micro-batch | step ms | tokens/s | TFLOP/s | MFU | peak mem GiB | MoT/dense |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in payload["training"]:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        ratio = f"{r['mot_over_dense']:.3f}" if "mot_over_dense" in r else ""
        lines.append(f"| {r['size']} | {r['arch']} | {r['rows']} x 4096 | {r['step_ms']:.1f} | {r['tokens_per_s']:,} | "
                     f"{r['achieved_tflops']} | {mfu} | {r['peak_memory_gib']} | {ratio} |")
    a = payload.get("attention")
    if a:
        lines += ["", f"## Attention at 4096 ({a['size']} heads: {a['heads']} x {a['head_dim']}, "
                  f"{a['rows']} rows, mask density {a['mask_density']})", "",
                  f"flex {a['flex_ms']} ms vs SDPA with a boolean mask {a['sdpa_bool_mask_ms']} ms (forward + "
                  f"backward): {a['flex_speedup']}x"]
    lines += ["", "## Sampling (250 Euler steps, CFG 4, cached prompt, 256-patch latents)", ""]
    for s in payload["sampling"]:
        lines.append(f"- {s['size']}: " + (s["error"] if "error" in s else
                     f"{s['images_per_s']} images/s (batch {s['batch_size']}, {s['images']} images in {s['seconds']} s)"))
    lines += ["", "## Goals", "", "| goal | value | target | result |", "|---|---|---|---|"]
    for name, g in payload["goals"].items():
        lines.append(f"| {name} | {g['value']} | {g['goal']} | {'pass' if g['pass'] else 'FAIL'} |")
    (out / "bench_gpu.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=["163M", "760M"])
    p.add_argument("--steps", type=int, default=10, help="timed training steps (median)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of this GPU, TFLOP/s")
    p.add_argument("--rows", type=int, default=None, help="fixed micro-batch rows (skips the search)")
    p.add_argument("--max-rows", type=int, default=64, help="upper bound of the micro-batch search")
    p.add_argument("--sample-batch", type=int, default=16)
    p.add_argument("--skip", nargs="*", default=[], choices=["training", "attention", "sampling"])
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU; none is visible here, so nothing was measured or written.")
        return
    gpu = torch.cuda.get_device_name()
    peak = peak_tflops(gpu, args.peak_tflops)
    if peak is None:
        print(f"no known bf16 peak for {gpu!r}: MFU is left empty (pass --peak-tflops)")
    torch.backends.cuda.matmul.allow_tf32 = True

    training = []
    if "training" not in args.skip:
        for size in args.sizes:
            mot = bench_training(size, "mot", args.steps, peak, args.rows, args.max_rows)
            release(mot)
            dense = bench_training(size, "dense", args.steps, peak, args.rows, args.max_rows)
            # Equal micro-batch for the ratio: MoT holds twice the weights, so it may fit fewer rows.
            same = dense["rows"] == mot["rows"]
            dense_at_mot = dense["step_ms"] / 1000 if same else time_at(dense, mot["rows"], args.steps)
            release(dense)
            mot["mot_over_dense"] = round(mot["step_ms"] / 1000 / dense_at_mot, 4)
            training += [mot, dense]
            print(json.dumps(mot), json.dumps(dense), sep="\n", flush=True)
    attention = None if "attention" in args.skip else bench_attention(args.sizes[-1], rows=1)
    sampling = [] if "sampling" in args.skip else [bench_sampling(s, args.sample_batch) for s in args.sizes]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    payload = {
        "benchmark": "bench_gpu", "command": "python eval/bench_gpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"gpu": gpu, "peak_tflops": peak, "torch": torch.__version__, "cuda": torch.version.cuda,
                    "commit": commit},
        "training": training, "attention": attention, "sampling": sampling,
        "goals": goals(training, attention),
    }
    write(payload, args.out)
    print(f"wrote {args.out / 'bench_gpu.json'} and .md")


if __name__ == "__main__":
    main()
