"""Backbone step time: MoT vs dense at equal FLOPs per token, and dense vs a plain PyTorch floor.

One forward+backward step of the backbone alone (no embeddings or heads) on a packed batch of
caption->image documents with as many text tokens as image patches. Three models per size:

* ``mot``   - transfusion_mot's Backbone with one weight group per modality,
* ``dense`` - the same code with one group (same shape, same FLOPs per token),
* ``floor`` - a plain pre-norm transformer written below (fused QKV, RoPE, SDPA with the same boolean
  mask, SwiGLU of the same hidden size): what the dense step should cost without our abstractions,
* ``floor_mot`` - the same plain block with two weight groups, as if the batch were sorted by modality
  (the first tokens of the flattened batch use group 0, the rest group 1; no routing, no gathers): what
  MoT's arithmetic alone costs, its matmuls and norms split in two. ``floor_mot / floor`` is the part
  of MoT/dense that no implementation of MoT can remove on this machine at this shape.

The models run interleaved inside every repetition (the order rotates) so that drift in a shared
machine's speed hits all of them alike; the reported numbers are medians after warm-up.
Goals (issue 4): MoT/dense <= 1.10 and dense/floor <= 1.15. A failed goal adds a profile of the
slowest ops of each model to the markdown.

``--compile`` adds MoT and dense with every block compiled as training compiles them
(``train.compile_blocks``: whole-block graphs, routing as an input). Goals (issue 19): compiled MoT /
compiled dense <= 1.05 and compiled dense <= eager dense, at the issue's shapes ``256x4`` and ``512x8``
(dim x layers, batch 8 x 100 tokens: documents of 32 caption tokens + 4 markers and 64 image patches).

    python eval/benchmarks/bench_backbone.py [--sizes debug small] [--reps 0 (auto)] [--warmup 3] [--threads N]
    python eval/benchmarks/bench_backbone.py --sizes 256x4 512x8 --compile --name bench_backbone_compile
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # eval/: common.py, shared by every eval script
import common

from transfusion_mot.components.flops import size_data
from transfusion_mot.config import load_config
from transfusion_mot.data.packing import IMAGE, Specials, pack
from transfusion_mot.data.segments import Image, Text
from transfusion_mot.model.masks import mask_from_batch
from transfusion_mot.model.mot import Backbone

RESULTS = Path(__file__).resolve().parents[1] / "results"
SPECIALS = Specials(bos=256, eos=257, pad=258, boi=259, eoi=260)
GOALS = {"mot_over_dense": 1.10, "dense_over_floor": 1.15,
         "compiled_mot_over_dense": 1.05, "compiled_dense_over_eager": 1.0}
# Benchmark shapes beyond the named sizes: config overrides, rows, seq_len, caption tokens per document.
SHAPES = {
    "256x4": (["model.dim=256", "model.n_layers=4", "model.n_heads=4"], 8, 100, 32),
    "512x8": (["model.dim=512", "model.n_layers=8", "model.n_heads=8"], 8, 100, 32),
}
SHAPE_MODEL = ["model.latent_channels=4", "model.latent_size=16", "model.patch_size=2", "data.resolution=64",
               "data.seq_len=100", "data.max_caption_tokens=32"]
STEP_BUDGET_S = 4.0  # default timed steps per model: this many seconds' worth (debug ~130 steps, small 30)
MOT_OVERHEAD = (
    "At `debug` (2 layers, D=64, 2048 tokens) MoT runs each per-modality projection, FFN and norm as two "
    "half-size ops and, per layer, merges the groups' Q/K/V into sequence order for attention and splits its "
    "output again (cat + one gather each way, ~0.2 ms); between layers the residual stream stays one tensor "
    "per group. On one thread this costs little: `--threads 1` gave MoT/dense 1.02-1.08 (0.99-1.06 in a "
    "quicker two-model loop). MoT runs ~1.7x as many ops, each half the size, so it pays the fixed cost of an"
    " op more often (a 16-token step: MoT 3.0 ms vs dense 1.7 ms) and, on this VM's two threads, the split of"
    " every op across both cores and the join after it; the two-thread ratio moves between runs of the same "
    "code minutes apart (1.04-1.09 in most, 1.14-1.21 in some; CPU steal at most 0.2% in the slow ones). At "
    "`small` (D=256) the matmuls dominate and MoT is within a few percent of dense. Tried and not kept: (a) a"
    " group-sorted single residual stream with per-group weights stacked (G, out, in) and F.grouped_mm (one "
    "op per projection, elementwise work once over all tokens, bit-identical forward): twelve alternating "
    "runs gave it 1.07-1.17 and the current code 1.04-1.15, since grouped_mm on the CPU loops over the groups "
    "itself, per-row norm weights need a gather (an index_add in the backward) and dense paid for weight[0] "
    "selects; (b) glibc malloc thresholds that keep freed memory in the process: page faults per dense step "
    "fell from 135-290 to 7-13, but slow runs stayed slow (1.14) and training throughput did not move beyond "
    "noise; (c) torch.compile (inductor, CPU) of all three models: 1.00-1.13 (routing's host sync, the id "
    "check and group counts, breaks MoT's graph). Kept: the boolean mask is converted to SDPA's additive form"
    " once per batch instead of once per layer.")


# ---------------------------------------------------------------- the floor: a plain transformer
class FloorBlock(nn.Module):
    """Pre-norm block, written as plainly as PyTorch allows."""

    def __init__(self, dim: int, n_heads: int, hidden: int):
        super().__init__()
        self.n_heads = n_heads
        self.attn_norm = nn.Parameter(torch.ones(dim))
        self.ffn_norm = nn.Parameter(torch.ones(dim))
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = F.rms_norm(x, (d,), self.attn_norm, 1e-6)
        q, k, v = self.qkv(h).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)  # (B, H, T, hd)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        gate, up = self.w13(F.rms_norm(x, (d,), self.ffn_norm, 1e-6)).chunk(2, dim=-1)
        return x + self.w2(F.silu(gate) * up)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (B, H, T, hd), halves convention; cos/sin (B, 1, T, hd/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class FloorMoTBlock(nn.Module):
    """Two FloorBlocks' weights, the first ``n`` tokens of the flattened batch through group 0 and the
    rest through group 1: MoT's arithmetic with the tokens already sorted by group (slices, no gathers;
    one concatenation each for attention's input and the block's output)."""

    def __init__(self, dim: int, n_heads: int, hidden: int):
        super().__init__()
        self.n_heads = n_heads
        self.groups = nn.ModuleList(FloorBlock(dim, n_heads, hidden) for _ in range(2))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        parts = (flat[:n], flat[n:])  # (N_g, D) each
        qkv = torch.cat([g.qkv(F.rms_norm(p, (d,), g.attn_norm, 1e-6)) for g, p in zip(self.groups, parts)])
        q, k, v = qkv.view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)  # (B, H, T, hd)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b * t, d)
        out = []
        for g, p, a_g in zip(self.groups, parts, (a[:n], a[n:])):
            h = p + g.proj(a_g)
            gate, up = g.w13(F.rms_norm(h, (d,), g.ffn_norm, 1e-6)).chunk(2, dim=-1)
            out.append(h + g.w2(F.silu(gate) * up))
        return torch.cat(out).view(b, t, d)


class Floor(nn.Module):
    def __init__(self, dim: int, n_layers: int, n_heads: int, hidden: int, theta: float = 10000.0, groups: int = 1):
        super().__init__()
        hd = dim // n_heads
        self.register_buffer("inv_freq", 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd), persistent=False)
        block = FloorBlock if groups == 1 else FloorMoTBlock
        self.blocks = nn.ModuleList(block(dim, n_heads, hidden) for _ in range(n_layers))
        self.norm = nn.Parameter(torch.ones(dim))
        self.groups = groups

    def forward(self, x, modality, position, mask) -> torch.Tensor:
        angles = position.float()[..., None] * self.inv_freq  # (B, T, hd/2)
        cos, sin = angles.cos()[:, None], angles.sin()[:, None]
        extra = () if self.groups == 1 else (int((modality != IMAGE).sum()),)  # group 0: the text tokens
        for block in self.blocks:
            x = block(x, cos, sin, mask, *extra)
        return F.rms_norm(x, (x.shape[-1],), self.norm, 1e-6)


# ---------------------------------------------------------------- models, batch, one step
def build(size: str, norm_placement: str, compile_backend: str | None = None) -> tuple[dict[str, nn.Module], object]:
    """The models of one size or shape (mot, dense, floor, floor_mot; + each compiled), and its config."""
    models = {}
    overrides = SHAPES[size][0] + SHAPE_MODEL if size in SHAPES else [f"model.size={size}", *size_data(size)]
    for arch in ("mot", "dense"):
        cfg = load_config(None, [*overrides, f"model.arch={arch}", f"model.norm_placement={norm_placement}"])
        models[arch] = Backbone(cfg.model.backbone, cfg.model.n_groups, cfg.model.moe)
    bb = cfg.model.backbone
    floor_shape = (bb.dim, bb.n_layers, bb.n_heads, bb.hidden, bb.rope_theta)
    models["floor"] = Floor(*floor_shape)
    models["floor_mot"] = Floor(*floor_shape, groups=2)
    if compile_backend:
        for name in ("mot", "dense", "floor", "floor_mot"):
            compiled = copy.deepcopy(models[name])  # the same weights
            # ours as train.compile_blocks compiles them (group sizes dynamic: Routing.mark_dynamic); the floors'
            # shapes, the text count included, never change here
            dynamic = None if name in ("mot", "dense") else False
            for block in compiled.blocks:
                block.compile(backend=compile_backend, fullgraph=True, dynamic=dynamic)
            models[f"{name}_compiled"] = compiled
    return models, cfg


def half_image_batch(cfg, rows: int, seq_len: int, seed: int = 0, caption: int | None = None):
    """Caption->image documents; by default their captions make text tokens equal image patches."""
    m = cfg.model
    n_patches = (m.latent_size // m.patch_size) ** 2
    caption = n_patches - 4 if caption is None else caption  # BOS, BOI, EOI, EOS are text tokens too
    doc_len = caption + 4 + n_patches
    if caption < 1 or doc_len > seq_len:
        raise ValueError(f"size {m.size}: a document of {caption} caption tokens and {n_patches} patches needs "
                         f"{doc_len} tokens, seq_len={seq_len}")
    g = torch.Generator().manual_seed(seed)
    docs = [[Text(torch.randint(0, 256, (caption,), generator=g).tolist()),
             Image(torch.randn(m.latent_channels, m.latent_size, m.latent_size, generator=g))]
            for _ in range(rows * (seq_len // doc_len))]
    return pack(docs, seq_len, SPECIALS, patch_size=m.patch_size, n_rows=rows)


def step(model: nn.Module, x: torch.Tensor, batch, mask: torch.Tensor) -> float:
    """Milliseconds of one forward + backward (gradients cleared first, as a train step does)."""
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    y = model(x, batch.modality, batch.position, mask)
    y.float().pow(2).mean().backward()
    return 1000.0 * (time.perf_counter() - start)


def bench_size(size: str, reps: int, warmup: int, rows: int | None, seq_len: int | None,
               norm_placement: str, compile_backend: str | None = None) -> dict:
    torch.manual_seed(0)
    models, cfg = build(size, norm_placement, compile_backend)
    shape = SHAPES.get(size, (None, None, None, None))
    rows = rows or shape[1] or cfg.data.batch_size  # the size's own training batch (8 x 256 for debug and small)
    seq_len = seq_len or shape[2] or cfg.data.seq_len
    batch = half_image_batch(cfg, rows, seq_len, caption=shape[3])
    mask = mask_from_batch(batch.doc_id, batch.image_id)
    x = torch.randn(rows, seq_len, cfg.model.dim, requires_grad=True)
    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(warmup):
        for name in names:
            step(models[name], x, batch, mask)
    if not reps:  # auto: ~STEP_BUDGET_S of timed steps per model, 30..150 of them (step times jitter ~10%)
        warm = statistics.median(step(models["dense"], x, batch, mask) for _ in range(3)) / 1000.0
        reps = max(30, min(150, round(STEP_BUDGET_S / warm)))
    counters = common.cpu_counters()
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]  # rotate who goes first
        for name in order:
            times[name].append(step(models[name], x, batch, mask))
    cpu = common.cpu_share(counters, common.cpu_counters())  # steal: the VM's CPUs lent elsewhere meanwhile
    med = {n: statistics.median(v) for n, v in times.items()}
    image_share = float((batch.modality == IMAGE).float().mean())
    return {
        "size": size, "rows": rows, "seq_len": seq_len, "dim": cfg.model.dim, "n_layers": cfg.model.n_layers,
        "image_token_share": round(image_share, 4), "padding_share": round(float((batch.doc_id < 0).float().mean()), 4),
        "reps": reps, "cpu_share": cpu, "median_ms": {n: round(v, 3) for n, v in med.items()},
        "min_ms": {n: round(min(v), 3) for n, v in times.items()},
        "mot_over_dense": round(med["mot"] / med["dense"], 4),
        "dense_over_floor": round(med["dense"] / med["floor"], 4),
        "floor_mot_over_floor": round(med["floor_mot"] / med["floor"], 4),  # MoT's arithmetic alone
        **({"compile_backend": compile_backend,
            "compiled_mot_over_dense": round(med["mot_compiled"] / med["dense_compiled"], 4),
            "compiled_dense_over_eager": round(med["dense_compiled"] / med["dense"], 4),
            "compiled_floor_mot_over_floor": round(med["floor_mot_compiled"] / med["floor_compiled"], 4)}
           if compile_backend else {}),
        "_models": models, "_inputs": (x, batch, mask),
    }


# ---------------------------------------------------------------- profile (only when a goal fails)
def profile(result: dict, top: int = 8) -> str:
    """Slowest ops (self CPU time) of one step of each model, as markdown code blocks."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    x, batch, mask = result["_inputs"]
    parts = []
    for name, model in result["_models"].items():
        step(model, x, batch, mask)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step(model, x, batch, mask)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
        parts.append(f"**{result['size']} / {name}**\n```\n{table}\n```")
    return "\n\n".join(parts)


# ---------------------------------------------------------------- report
def machine() -> dict:
    return {**common.machine(), "commit": common.commit()}


def write(results: list[dict], info: dict, command: str, profiles: str, out: Path, stem: str = "bench_backbone") -> None:
    out.mkdir(parents=True, exist_ok=True)
    goals = {f"{r['size']}:{k}": {"value": r[k], "goal": f"<= {g}", "pass": r[k] <= g}
             for r in results for k, g in GOALS.items() if k in r}
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
    payload = {"benchmark": "bench_backbone", "command": command, "machine": info, "results": clean, "goals": goals}
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")

    lines = ["# Backbone step time: MoT vs dense vs a plain PyTorch floor", "",
             f"Command: `{command}`  ", f"Commit: `{info['commit']}`  ",
             f"Machine: {info['processor']}, {info['cpus']} CPUs ({info['torch_threads']} torch threads), "
             f"torch {info['torch']}, device {info['device']}, 1-min load average at the end "
             f"{info['load_average_1m']}", "",
             "Forward + backward of the backbone alone on caption->image documents (named sizes: as many text "
             "tokens as image patches; the 256x4 / 512x8 shapes: 36 text tokens and 64 patches per document), "
             "medians of the timed steps after warm-up, the three models interleaved in every repetition. CPU "
             "busy / steal: the machine's CPU time during the timed steps (/proc/stat); steal is time the "
             "hypervisor gave this VM's CPUs to others.", "",
             "| size | batch x seq | timed steps | MoT ms | dense ms | floor ms | MoT/dense | dense/floor "
             "| floor MoT/floor | CPU busy / steal |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in clean:
        ms = r["median_ms"]
        lines.append(f"| {r['size']} | {r['rows']} x {r['seq_len']} | {r['reps']} | {ms['mot']:.2f} | "
                     f"{ms['dense']:.2f} | {ms['floor']:.2f} | {r['mot_over_dense']:.3f} | "
                     f"{r['dense_over_floor']:.3f} | {r['floor_mot_over_floor']:.3f} | {_cpu(r['cpu_share'])} |")
    compiled = [r for r in clean if "compile_backend" in r]
    if compiled:
        lines += ["", f"Compiled ({compiled[0]['compile_backend']}; every block as `train.compile_blocks` compiles it):",
                  "", "| size | batch x seq | compiled MoT ms | compiled dense ms | compiled MoT/dense "
                  "| compiled dense / eager dense | eager MoT/dense | compiled floor MoT/floor |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in compiled:
            ms = r["median_ms"]
            lines.append(f"| {r['size']} | {r['rows']} x {r['seq_len']} | {ms['mot_compiled']:.2f} | "
                         f"{ms['dense_compiled']:.2f} | {r['compiled_mot_over_dense']:.3f} | "
                         f"{r['compiled_dense_over_eager']:.3f} | {r['mot_over_dense']:.3f} | "
                         f"{r['compiled_floor_mot_over_floor']:.3f} |")
    lines += ["", "| goal | value | target | result |", "|---|---|---|---|"]
    for name, g in goals.items():
        lines.append(f"| {name} | {g['value']:.3f} | {g['goal']} | {'pass' if g['pass'] else 'FAIL'} |")
    lines += ["", "## Where MoT's extra time goes", "", MOT_OVERHEAD]
    if profiles:
        lines += ["", "## Profile (a goal failed)", "", profiles]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


def _cpu(share: dict | None) -> str:
    return "n/a" if share is None else f"{share['busy']:.0%} / {share['steal']:.1%}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=["debug", "small"])
    p.add_argument("--reps", type=int, default=0,
                   help="timed repetitions (medians over these); 0: ~4 s of steps per model, 30..150")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rows", type=int, default=None, help="batch rows (default: the size's data.batch_size)")
    p.add_argument("--seq-len", type=int, default=None, help="default: data.seq_len")
    p.add_argument("--norm-placement", default="pre", choices=["pre", "post"],
                   help="MoT/dense norm placement; 'pre' matches the floor op for op")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's own choice)")
    p.add_argument("--compile", action="store_true", help="also MoT and dense with compiled blocks")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend for --compile")
    p.add_argument("--name", default="bench_backbone", help="results file stem in --out")
    p.add_argument("--no-profile", action="store_true", help="no op profile when a goal fails")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.reps < 0 or 0 < args.reps < 10:
        p.error("--reps must be >= 10 (medians of at least 10 steps), or 0 for the automatic count")
    command = "python eval/benchmarks/bench_backbone.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results = []
    for size in args.sizes:
        r = bench_size(size, args.reps, args.warmup, args.rows, args.seq_len, args.norm_placement,
                       args.compile_backend if args.compile else None)
        print(f"{size}: {r['median_ms']} MoT/dense={r['mot_over_dense']:.3f} dense/floor={r['dense_over_floor']:.3f}"
              + (f" compiled MoT/dense={r['compiled_mot_over_dense']:.3f} compiled/eager dense="
                 f"{r['compiled_dense_over_eager']:.3f}" if args.compile else ""))
        results.append(r)
    failed = [] if args.no_profile else [r for r in results if any(r[k] > g for k, g in GOALS.items() if k in r)]
    profiles = "\n\n".join(profile(r) for r in failed)
    write(results, machine(), command.strip(), profiles, args.out, args.name)
    print(f"wrote {args.out / args.name}.json and .md")


if __name__ == "__main__":
    main()
