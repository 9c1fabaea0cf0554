"""MoT vs dense vs MoE-4x at equal FLOPs per token, at small scale, in the MoT paper's Transfusion and
Chameleon settings.

Every arm trains the same ``small`` shape on the same data and seed for the same number of steps, so
dense, MoT and MoE-4x spend the same FLOPs per token; a dense model with twice the layers (the same
total parameters as the MoT, about 2x its FLOPs) gives the paper's "small MoT vs larger dense" pair,
and the headline pair (MoT, dense) is trained with a second seed to show run-to-run noise.

Validation losses come from the runs' own fixed-t-grid, fixed-noise evaluations (``train.eval_every``)
and are plotted against training FLOPs (FLOPs/token x tokens seen). Two data settings: ``shapes``
(generated, with a prompt-following score) and ``flickr`` (the Flickr8k subset in the shared assets,
TAEF2 latents, the Llama 2 tokenizer). ``--settings chameleon`` runs the Chameleon setting instead (shapes
through one shared VQ tokenizer, configs/chameleon_small.yaml's shape, one next-token loss): its image loss
is the validation image-token NLL (``val_image_nll``) and it writes ``compare_archs_chameleon.*``, so the
Transfusion results stay. Each setting is run under both norm placements (``--norms``): the
MoT paper's Algorithm 1 (``post``: the norm after each sublayer, inside the residual branch) and pre-norm.
Runs live in ``<out>/runs/<setting>/<norm>/<arm>-s<seed>``, resume with ``train.resume=auto`` and are
skipped once finished, so an interrupted job picks up where it was.

    python eval/experiments/compare_archs.py                   # the default budget (~45 min per norm placement, 2-core CPU)
    python eval/experiments/compare_archs.py --steps 4000      # a larger budget (use a fresh --out)
    python eval/experiments/compare_archs.py --settings chameleon   # the Chameleon setting (~30 min per norm placement)
    python eval/experiments/compare_archs.py --smoke --out /tmp/cmp   # seconds: the debug size, a few steps
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # eval/: common.py, shared by every eval script
from common import REPO, RESULTS, commit, write_results
from compare_archs_report import PAIR, image_key, markdown, plot

from transfusion_mot.components.flops import model_flops_per_token
from transfusion_mot.config import Config, config_from_dict, load_config
from transfusion_mot.data.pipeline import build_records, iter_records, prepare_tokenizer
from transfusion_mot.model import build_model
from transfusion_mot.train import train

NAME = "compare_archs"
NORMS = ("post", "pre")  # model.norm_placement: Algorithm 1's post-sublayer norm, and pre-norm
ARMS = ("dense", "mot", "moe", "dense_large")
N_EVALS = 6  # validation points per run (the curves)
WALL = "compare_wall.json"  # wall-clock and CPU seconds in train() for this run, summed over resumed invocations,
# and the commit(s) of the code that trained it
CODE = commit()  # what this process imported: the results file is written later, maybe at a newer HEAD

# Default steps per setting, sized from runs measured on the shared 2-core CPU (a dense shapes run:
# ~0.7 s/step, 64 prompts x 25 sampling steps = 151 s, a 64-pair validation ~14 s, all at load 5-7;
# about half of that on an idle machine). 6 runs per setting (dense_large counts twice, MoE ~1.3x)
# plus the one-off shapes VAE (~15 CPU-minutes when not cached) come to ~40 minutes for both settings.
# Chameleon (chameleon_small's shape: 256 codes + caption per example, seq 320), measured with OMP_NUM_THREADS=1
# on the shared 2-core CPU at load ~5: 2.2 s/step dense or MoE-4x, a 32-pair validation 6 s, 16 prompts
# sampled (256 codes each, KV cache) 10 s. Per norm placement 7 step-units of runs (dense_large twice)
# x 80 steps x 2.2 s = ~21 min, + ~6 min of evaluation, + the shared VQ tokenizer once (~5 min): ~30 min.
CHAMELEON_STEPS = 80
DEFAULT_STEPS = {"shapes": 250, "flickr": 200, "chameleon": CHAMELEON_STEPS}
SMOKE_STEPS = 4

# Quick evaluation: the losses are on fixed examples and fixed noise, so 32 pairs already compare
# runs paired (same examples, same noise). Sampling dominates a short run's cost, so prompt-following
# uses 32 prompts x 20 Euler steps on shapes and the flickr grid only 8 prompts. The short schedule
# warms up for 10% of the steps (the small configs' 100 would be 40% of the default budget).
EVAL = ["eval.val_examples=32", "eval.val_t_grid=8", "eval.sample_steps=20", "eval.batch_size=32",
        "train.ema_decay=0", "train.log_every=10"]
PROMPTS = {"shapes": 32, "flickr": 8, "chameleon": 16}
SMOKE_EVAL = ["eval.val_examples=8", "eval.val_t_grid=2", "eval.sample_steps=2", "eval.n_prompts=4",
              "train.ema_decay=0", "train.log_every=1", "codec.vae_steps=4", "codec.vq_steps=4"]


@dataclass
class Run:
    """One trained arm: what it is, its cost and its validation curve."""

    setting: str
    arm: str
    arch: str
    seed: int
    steps: int
    params_total: int
    params_active: int
    flops_per_token: float
    tokens_per_step: float
    wall_s: float
    cpu_s: float
    commits: list[str] = field(default_factory=list)  # the code that trained it (more than one if resumed across)
    curve: list[dict] = field(default_factory=list)  # step, flops, val_flow, val_lm, val_ppl, val_caption_nll
    final: dict = field(default_factory=dict)  # results.json of the run

    @property
    def label(self) -> str:
        return f"{self.arm}-s{self.seed}"

    @property
    def total_flops(self) -> float:
        return self.flops_per_token * self.tokens_per_step * self.steps


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------
def flickr_overrides(assets: Path, resolution: int) -> list[str]:
    """Flickr8k through TAEF2 (32 channels, 8x down) with the Llama 2 tokenizer.

    Patch size 1: at 64 px the latent is 8x8, so each image is 64 tokens, as many as a shapes image
    (16x16 latent, patch 2). Patch 2 would leave 16 image tokens per image, so text would dominate
    the sequence and the image loss would rest on very few tokens. Llama 2's 32k vocabulary (not
    GPT-2's 50k) keeps the embedding and LM head, the costliest part on CPU, as small as a real
    tokenizer allows. 10% of the images are held out for validation (never trained on).
    """
    return [
        "data.source=imagefolder", f"data.path={assets / 'images' / 'flickr8k-1000'}",
        f"data.tokenizer={assets / 'tokenizers' / 'llama2' / 'tokenizer.model'}", "data.val_fraction=0.1",
        "codec.kind=taef2", f"codec.encoder_path={assets / 'vae' / 'taef2_encoder.pth'}",
        f"codec.decoder_path={assets / 'vae' / 'taef2_decoder.pth'}",
        "model.latent_channels=32", f"model.latent_size={resolution // 8}", "model.patch_size=1",
    ]


def arm_config(setting: str, arm: str, seed: int, steps: int, run_dir: Path, assets: Path, smoke: bool,
               extra: list[str]) -> Config:
    """The resolved config of one run. ``dense_large`` is dense with twice the base's layers."""
    arch = "dense" if arm == "dense_large" else arm
    name = ("chameleon_debug" if smoke else "chameleon_small") if setting == "chameleon" else \
        ("debug" if smoke else f"small_{arch}")
    base = REPO / "configs" / f"{name}.yaml"
    overrides = [f"model.arch={arch}", f"name={setting}-{arm}"]
    if arm == "dense_large":
        overrides.append(f"model.n_layers={2 * load_config(str(base), check=False).model.n_layers}")
    if setting == "flickr":
        resolution = load_config(str(base), check=False).data.resolution
        overrides += flickr_overrides(assets, resolution)
    every = max(1, steps // N_EVALS)
    overrides += SMOKE_EVAL if smoke else [*EVAL, f"eval.n_prompts={PROMPTS[setting]}",
                                           f"optim.warmup_steps={max(1, steps // 10)}"]
    overrides += [f"train.steps={steps}", f"train.seed={seed}", f"train.out_dir={run_dir}", "train.resume=auto",
                  f"train.eval_every={every}", f"train.save_every={every}", "train.keep_checkpoints=1", *extra]
    return load_config(str(base), overrides)


def _comparable(cfg: Config) -> dict:
    tree = json.loads(json.dumps(cfg.to_dict(), default=list))
    tree["train"].pop("resume", None)
    return tree


def check_run_dir(cfg: Config, run_dir: Path) -> None:
    """A run dir holds one experiment: refuse to resume or reuse it under a different config."""
    saved = run_dir / "config.yaml"
    if not saved.exists():
        return
    old = _comparable(config_from_dict(yaml.safe_load(saved.read_text())))  # older layouts read as today's
    new = _comparable(cfg)
    diffs = [f"{sec}.{k}: {old.get(sec, {}).get(k)!r} -> {v!r}" for sec, part in new.items() if isinstance(part, dict)
             for k, v in part.items() if old.get(sec, {}).get(k) != v]
    if diffs:
        raise SystemExit(f"{run_dir} was trained with another config ({'; '.join(diffs[:4])}); "
                         f"use another --out for a new budget, or delete that folder")


# --------------------------------------------------------------------------------------------------
# Training and reading runs back
# --------------------------------------------------------------------------------------------------
def is_done(run_dir: Path) -> bool:
    return (run_dir / "results.json").exists() and (run_dir / WALL).exists()


def train_run(cfg: Config, run_dir: Path) -> None:
    """Train (or resume) one run, adding this invocation's wall-clock and CPU seconds to the run's
    totals even if interrupted. CPU seconds (all threads) tell a busy machine from a slow model."""
    partial = run_dir / (WALL + ".partial")
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        train(cfg, evaluate_at_end=True)
    finally:
        spent = json.loads(partial.read_text()) if partial.exists() else {"seconds": 0.0, "cpu_seconds": 0.0}
        spent = {"seconds": spent["seconds"] + time.perf_counter() - t0,
                 "cpu_seconds": spent["cpu_seconds"] + time.process_time() - c0,
                 "commits": sorted({*spent.get("commits", []), CODE})}
        run_dir.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(spent))
        if (run_dir / "results.json").exists():  # finished: the totals are final
            partial.replace(run_dir / WALL)


def data_stats(cfg: Config, tokenizer, n: int = 256) -> tuple[float, float]:
    """(tokens per example, text share of them), estimated from the first ``n`` training captions.

    An example is BOS, caption, BOI, patches, EOI, EOS; caption dropout empties a share of captions.
    """
    records = build_records(cfg.data, "train")
    lengths = []
    for rec in iter_records(records):  # unreadable records are skipped, as the trainer skips them
        lengths.append(min(len(tokenizer.encode(rec.captions[0])), cfg.data.max_caption_tokens))
        if len(lengths) == n:
            break
    if not lengths:
        raise ValueError(f"no readable training records in {getattr(records, 'name', cfg.data.path)}")
    keep = 1.0 - cfg.data.caption_first * cfg.data.caption_dropout
    caption = keep * sum(lengths) / len(lengths)
    patches = (cfg.model.latent_size // cfg.model.patch_size) ** 2
    text = caption + 2  # BOS, EOS
    return text + patches + 2, text / (text + patches + 2)


def read_run(cfg: Config, setting: str, arm: str, run_dir: Path, stats: tuple[float, float], vocab: int) -> Run:
    """Cost (parameters, FLOPs/token, tokens/step, wall-clock) and validation curve of a finished run."""
    from transfusion_mot.data.pipeline import examples_per_batch

    model_cfg = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or vocab)
    with torch.device("meta"):
        model = build_model(model_cfg)
    doc_tokens, text_share = stats
    fpt = model_flops_per_token(model_cfg, cfg.data.seq_len, training=True, text_fraction=text_share)
    tokens_per_step = doc_tokens * examples_per_batch(cfg) * cfg.train.grad_accum
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    keys = (image_key(setting), "val_lm", "val_ppl", "val_caption_nll")
    curve = [{"step": r["step"], "flops": fpt * tokens_per_step * r["step"], **{k: r.get(k) for k in keys}}
             for r in rows if keys[0] in r]
    spent = json.loads((run_dir / WALL).read_text())
    return Run(setting, arm, cfg.model.arch, cfg.train.seed, cfg.train.steps, model.num_params(),
               model.num_params(active=True), fpt, tokens_per_step, spent["seconds"], spent["cpu_seconds"],
               spent.get("commits", []), curve, json.loads((run_dir / "results.json").read_text()))


# --------------------------------------------------------------------------------------------------
# Headline figures
# --------------------------------------------------------------------------------------------------
def flops_to_reach(curve: list[dict], key: str, target: float) -> float | None:
    """FLOPs at which ``curve`` first reaches ``target`` (<=), linear in log-FLOPs between points.

    None when it never does. If the first point already reaches it, that point's FLOPs is returned:
    an upper bound, since nothing was measured before it.
    """
    points = [(c["flops"], c[key]) for c in curve if c.get(key) is not None and math.isfinite(c[key])]
    for i, (f, loss) in enumerate(points):
        if loss <= target:
            if i == 0:
                return f
            f0, l0 = points[i - 1]
            w = (l0 - target) / (l0 - loss)
            return math.exp(math.log(f0) + w * (math.log(f) - math.log(f0)))
    return None


def fraction(candidate: Run, reference: Run, key: str) -> dict:
    """The share of ``reference``'s training FLOPs ``candidate`` needs to reach its final ``key`` loss."""
    target = reference.curve[-1][key]
    reached = flops_to_reach(candidate.curve, key, target)
    out = {"target": target, "candidate_final": candidate.curve[-1][key],
           "fraction": None if reached is None else reached / reference.total_flops}
    if reached is None:
        out["note"] = "not reached"
    elif reached == candidate.curve[0]["flops"]:
        out["note"] = "reached by the first evaluation (an upper bound)"
    else:
        out["note"] = "reached"
    return out


def headline(runs: list[Run]) -> dict:
    """The paper's figures for one setting: MoT and MoE vs dense, small MoT vs larger dense, seed spread."""
    by = {(r.arm, r.seed): r for r in runs}
    seeds = sorted({r.seed for r in runs if r.arm in PAIR})
    first = seeds[0] if seeds else 0
    keys = (image_key(runs[0].setting), "val_lm")
    out: dict = {}
    for arm in ("mot", "moe", "dense_large"):
        if (arm, first) in by and ("dense", first) in by and arm != "dense_large":
            out[f"{arm}_vs_dense"] = {k: fraction(by[arm, first], by["dense", first], k) for k in keys}
    if ("mot", first) in by and ("dense_large", first) in by:
        mot, large = by["mot", first], by["dense_large", first]
        out["mot_vs_dense_large"] = {
            "flops_ratio_large_over_mot": large.total_flops / mot.total_flops,
            "params_total": {"mot": mot.params_total, "dense_large": large.params_total},
            **{k: {"mot_final": mot.curve[-1][k], "dense_large_final": large.curve[-1][k],
                   "mot_better": mot.curve[-1][k] < large.curve[-1][k],
                   **{f"mot_{n}": v for n, v in fraction(mot, large, k).items() if n in ("fraction", "note")}}
               for k in keys}}
    spread: dict = {}
    for arm in PAIR:
        finals = {s: by[arm, s] for s in seeds if (arm, s) in by}
        if len(finals) > 1:
            spread[arm] = {k: {"values": [r.curve[-1][k] for r in finals.values()],
                               "spread": max(r.curve[-1][k] for r in finals.values())
                               - min(r.curve[-1][k] for r in finals.values())} for k in keys}
    per_seed = {s: {k: fraction(by["mot", s], by["dense", s], k)["fraction"] for k in keys}
                for s in seeds if ("mot", s) in by and ("dense", s) in by}
    if len(per_seed) > 1:
        spread["mot_fraction_per_seed"] = per_seed
    out["seed_spread"] = spread
    return out


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------
def plan(archs: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    """(arm, seed) pairs: the headline pair with every seed, the other arms with the first seed."""
    jobs = [(a, seeds[0]) for a in archs]
    jobs += [(a, s) for s in seeds[1:] for a in archs if a in PAIR]
    return jobs


def shared_codec(setting: str, args, steps: int) -> tuple[list[str], float]:
    """Overrides that give every run of a setting the same codec, and the seconds it took to make.

    The small VAE (Chameleon: VQ tokenizer) is trained per seed by default; here it is trained once (first
    seed's config) and pinned with ``codec.path``, so all runs, seeds included, predict the same latents (or
    codes) and their image losses compare.
    """
    from transfusion_mot.data.pipeline import train_codec_for
    from transfusion_mot.data.vq_train import train_tokenizer_for

    probe = arm_config(setting, "dense", args.seeds[0], steps, args.out / "runs" / setting / "codec-probe",
                       args.assets, args.smoke, args.set)
    if probe.codec.kind not in ("trained", "vq") or probe.codec.path:
        return [], 0.0
    t0 = time.perf_counter()
    path = (train_tokenizer_for if probe.codec.kind == "vq" else train_codec_for)(probe)
    return [f"codec.path={path}"], time.perf_counter() - t0


def run_setting(setting: str, norm: str, args, steps: int, train_runs: bool = True) -> tuple[list[Run], float]:
    """Train (or skip, when finished) every run of a setting under one norm placement; returns the runs and
    the codec seconds (the codec is shared by both placements)."""
    runs = []
    stats = vocab = None
    codec, codec_s = shared_codec(setting, args, steps)
    for arm, seed in plan(args.archs, args.seeds):
        run_dir = args.out / "runs" / setting / norm / f"{arm}-s{seed}"
        cfg = arm_config(setting, arm, seed, steps, run_dir, args.assets, args.smoke,
                         [*codec, f"model.norm_placement={norm}", *args.set])
        check_run_dir(cfg, run_dir)
        if train_runs and not is_done(run_dir):
            print(f"[{NAME}] {setting}/{norm}-norm: training {arm} seed {seed} for {steps} steps -> {run_dir}",
                  flush=True)
            train_run(cfg, run_dir)
            if not is_done(run_dir):  # train() saved and returned on SIGTERM / Ctrl-C
                raise SystemExit(f"[{NAME}] {run_dir} was stopped before its end; run the same command again "
                                 f"to resume it")
        elif not is_done(run_dir):
            print(f"[{NAME}] {setting}: {run_dir} is not finished; left out", flush=True)
            continue
        if stats is None:
            tokenizer = prepare_tokenizer(cfg)
            stats, vocab = data_stats(cfg, tokenizer), tokenizer.vocab_size
        runs.append(read_run(cfg, f"{setting}/{norm}-norm", arm, run_dir, stats, vocab))
    return runs, codec_s


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", default="shapes,flickr", help="comma list of: shapes, flickr; or chameleon alone")
    p.add_argument("--archs", default=",".join(ARMS), help=f"comma list of: {', '.join(ARMS)}")
    p.add_argument("--norms", default=",".join(NORMS), help="comma list of norm placements: post (Algorithm 1), pre")
    p.add_argument("--seeds", default="0,1", help="seeds of the headline pair (mot, dense); other arms use the first")
    p.add_argument("--steps", type=int, default=0, help="steps per run (0: the default budget of each setting)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder (runs go to <out>/runs)")
    p.add_argument("--assets", type=Path, default=REPO.parent / "shared" / "assets", help="the shared assets folder")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    p.add_argument("--report-only", action="store_true", help="no training: tabulate the finished runs")
    p.add_argument("--smoke", action="store_true", help=f"debug size, {SMOKE_STEPS} steps, tiny evaluation (tests)")
    args = p.parse_args(argv)
    args.settings = [s for s in args.settings.split(",") if s]
    args.archs = [a for a in args.archs.split(",") if a]
    args.norms = [n for n in args.norms.split(",") if n]
    for n in args.norms:
        if n not in NORMS:
            p.error(f"--norms: unknown norm placement {n!r}; choose from {', '.join(NORMS)}")
    if any(o.startswith("model.norm_placement=") for o in args.set):
        p.error("--set model.norm_placement=...: use --norms")
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    for s in args.settings:
        if s not in DEFAULT_STEPS:
            p.error(f"--settings: unknown setting {s!r}; choose from {', '.join(DEFAULT_STEPS)}")
    if "chameleon" in args.settings and len(args.settings) > 1:
        p.error("--settings chameleon runs alone (its results are compare_archs_chameleon.*)")
    for a in args.archs:
        if a not in ARMS:
            p.error(f"--archs: unknown arm {a!r}; choose from {', '.join(ARMS)}")
    if not args.seeds:
        p.error("--seeds: give at least one seed")
    if args.steps < 0:
        p.error(f"--steps={args.steps} must be >= 0")
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    name = f"{NAME}_chameleon" if args.settings == ["chameleon"] else NAME  # the Transfusion results stay
    runs: dict[str, list[Run]] = {}
    codec_s: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for setting in args.settings:
        if setting == "flickr" and not (args.assets / "images" / "flickr8k-1000").is_dir():
            skipped[setting] = f"shared assets not found at {args.assets} (pass --assets)"
            print(f"[{NAME}] flickr skipped: {skipped[setting]}", flush=True)
            continue
        steps = args.steps or (SMOKE_STEPS if args.smoke else DEFAULT_STEPS[setting])
        for norm in args.norms:
            key = f"{setting}/{norm}-norm"
            runs[key], seconds = run_setting(setting, norm, args, steps, train_runs=not args.report_only)
            codec_s[setting] = codec_s.get(setting, 0.0) + seconds  # made once; the second placement reuses it
    heads = {s: headline(rs) for s, rs in runs.items() if rs}
    args.out.mkdir(parents=True, exist_ok=True)
    png = plot(runs, args.out, name) if any(runs.values()) else None
    data = {"settings": {s: {"runs": [dataclasses.asdict(r) | {"total_flops": r.total_flops} for r in rs]}
                         for s, rs in runs.items()},
            "headline": heads, "codec_seconds": codec_s, "skipped": skipped,
            "plot": png.name if png else None, "smoke": args.smoke}
    path = write_results(name, data, markdown(runs, heads, skipped, name), args.out)
    print(f"[{NAME}] wrote {path}, {path.with_suffix('.md')}" + (f", {png}" if png else ""), flush=True)
    return path


if __name__ == "__main__":
    main()
