"""What every eval script and benchmark shares: machine facts, the commit, timing, and writing
``eval/results/<name>.json`` + ``.md`` (the json is the record, the markdown is for people)."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]


def commit() -> str:
    """HEAD's hash, with ``+dirty`` when the tree has uncommitted changes to tracked files outside
    eval/results (a benchmark rewriting its own result files is not a change to the code it measured)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)eval/results"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "") if head else "unknown"
    except OSError:
        return "unknown"


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "load_average_1m": round(os.getloadavg()[0], 2)}  # other jobs on the machine add noise
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    info["device"] = info.get("gpu", f"CPU ({info['cpus']} cores)")
    return info


def cpu_counters() -> dict[str, int] | None:
    """Linux's cumulative CPU time of the whole machine (/proc/stat, in clock ticks): busy, idle, and
    steal (time the hypervisor gave this VM's CPUs to someone else). None where there is no /proc/stat."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return {"busy": user + nice + system + irq + softirq, "idle": idle + iowait, "steal": steal}


def cpu_share(before: dict | None, after: dict | None) -> dict[str, float] | None:
    """Shares of the machine's CPU time between two ``cpu_counters`` readings: busy, idle, steal."""
    if before is None or after is None:
        return None
    delta = {k: after[k] - before[k] for k in before}
    total = sum(delta.values()) or 1
    return {k: round(v / total, 4) for k, v in delta.items()}


def command() -> str:
    return " ".join(["python", *[a if " " not in a else repr(a) for a in sys.argv]])


def median_time(fn, reps: int, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` over ``reps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def md_table(rows: list[dict], columns: list[str] | None = None, digits: int = 4) -> str:
    columns = columns or list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.{digits}g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, data: dict, markdown: str, out_dir: Path | None = None) -> Path:
    """``<out_dir>/<name>.json`` (with machine, commit, command) and ``<name>.md``."""
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"name": name, "commit": commit(), "command": command(), "machine": machine(), **data}
    (out_dir / f"{name}.json").write_text(json.dumps(record, indent=2, default=str))
    header = (f"_commit `{record['commit']}` · {record['machine']['device']} · torch {record['machine']['torch']}_\n\n"
              f"```\n{record['command']}\n```\n\n")
    (out_dir / f"{name}.md").write_text(markdown.replace("{header}", header) if "{header}" in markdown
                                        else header + markdown)
    return out_dir / f"{name}.json"


# ---------------------------------------------------------------- prompts and resumable generation
def read_prompts(path: str | Path, n: int | None = None) -> list[str]:
    """Prompts from a .txt (one per line), .csv (a ``prompt`` column, e.g. COCO-30K), .tsv (``Prompt``,
    PartiPrompts) or .jsonl (``prompt`` field, GenEval metadata). CSV/TSV go through a CSV reader:
    COCO-30K has prompts with embedded newlines."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: prompts file {path} does not exist")
    if path.suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
        key = next((k for k in ("prompt", "Prompt", "caption", "text") if rows and k in rows[0]), None)
        if key is None:
            raise SystemExit(f"error: {path} has no prompt column (columns: {list(rows[0]) if rows else []})")
        prompts = [" ".join(r[key].split()) for r in rows]
    elif path.suffix == ".jsonl":
        prompts = [json.loads(line)["prompt"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = [p for p in prompts if p]
    return prompts[:n] if n else prompts


def process_state():
    """accelerate's view of this process: rank and world size under ``accelerate launch`` (one process
    otherwise), its device (``cuda:<local rank>`` on GPUs, else CPU) and a barrier."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # on a machine without CUDA (or with ACCELERATE_USE_CPU=1, as accelerate's own Accelerator reads it) the
    # processes join over gloo; PartialState alone would leave each one on its own
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


def load_pipeline(args, state=None):
    """``from_pretrained(--ckpt)`` on ``--device`` (default: this process's device: CUDA when present) in
    ``--dtype`` (default: bf16 on CUDA, fp32 on CPU)."""
    from transfusion_mot import from_pretrained

    device = args.device if args.device is not None else (state.device if state is not None else None)
    return from_pretrained(args.ckpt, device=device, dtype=args.dtype)


def generate_for_metric(args, prompts: list[str], out: Path) -> tuple[list[Path] | None, object]:
    """The images a prompt-conditioned metric scores: the run loaded on this process's device, ``--steps /
    --cfg / --seed`` defaulted from the run, this process's share generated into ``out/images`` (resumable).
    Returns (every image's path, or None on processes other than the first, which only generate; the state)."""
    state = process_state()
    pipe = load_pipeline(args, state)
    run_sampling_defaults(args, pipe)
    paths = generate_missing(pipe, prompts, out / "images", args.steps, args.cfg, args.seed, args.batch_size, state)
    return (paths if state.is_main_process else None), state


def generate_missing(pipe, prompts: list[str], out_dir: Path, steps: int, cfg_scale: float, seed: int = 0,
                     batch_size: int = 16, state=None) -> list[Path]:
    """``out_dir/{i:06d}.png`` for every prompt; chunks whose images all exist are skipped, so a killed
    run continues where it stopped and gives the same images (image i is seeded by its index).

    Under ``accelerate launch`` (``state``: ``process_state()``) process r of W generates chunks r, r + W,
    ... and all wait for each other at the end: the images are those of one process, whatever W."""
    from tqdm.auto import tqdm

    from transfusion_mot.components.tracking import save_png

    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{i:06d}.png" for i in range(len(prompts))]
    mine = list(range(0, len(prompts), batch_size))[rank::world]  # fixed by index: no race on what exists
    todo = [s for s in mine if not all(p.exists() for p in paths[s:s + batch_size])]
    desc = f"generating ({len(prompts)} images" + (f", process {rank} of {world})" if world > 1 else ")")
    for start in tqdm(todo, desc=desc, disable=not todo):
        chunk = prompts[start:start + batch_size]
        images = pipe.generate(chunk, steps=steps, cfg_scale=cfg_scale, seed=seed, batch_size=batch_size,
                               first_index=start)
        for path, img in zip(paths[start:start + batch_size], images):
            if not path.exists():
                save_png(img, path)
    if state is not None:
        state.wait_for_everyone()
    return paths


def run_sampling_defaults(args, pipe) -> None:
    """``--steps / --cfg / --seed`` left unset take the run's own ``sample.*`` (recorded as used)."""
    a = pipe.sampling(steps=args.steps, cfg_scale=args.cfg, seed=args.seed)
    args.steps, args.cfg, args.seed = a["steps"], a["cfg_scale"], a["seed"]


def add_device_args(p) -> None:
    p.add_argument("--device", default=None,
                   help="cpu | cuda | cuda:N (default: CUDA when present; under accelerate launch, each process's GPU)")
    p.add_argument("--dtype", default=None, help="auto (default: bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16")


def add_generation_args(p) -> None:
    p.add_argument("--ckpt", required=True, help="run directory (or its model/ folder)")
    p.add_argument("--prompts", required=True, help=".txt / .csv (COCO-30K) / .tsv (Parti) / .jsonl (GenEval)")
    p.add_argument("--n", type=int, default=None, help="first N prompts (default all)")
    p.add_argument("--steps", type=int, default=None, help="default: the run's sample.steps")
    p.add_argument("--cfg", type=float, default=None, help="default: the run's sample.cfg_scale")
    p.add_argument("--seed", type=int, default=None, help="default: the run's sample.seed")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", required=True, help="folder for images/, results.json and results.md")
    add_device_args(p)


# ---------------------------------------------------------------- the training pipeline and the bare step
def pipeline_stream(cfg, run_dir: Path):
    """(tokenizer, encode, ExampleSource, Specials) of ``cfg``'s training data, as train.py builds them."""
    from transfusion_mot.data.packing import Specials
    from transfusion_mot.data.pipeline import ExampleSource, build_records, prepare_codec, prepare_tokenizer

    tokenizer = prepare_tokenizer(cfg)
    records = build_records(cfg.data, "train")
    _, encode = prepare_codec(cfg, Path(run_dir), records=records)
    return tokenizer, encode, ExampleSource(records, tokenizer, cfg), Specials.of(tokenizer)


def bare_step(cfg, batches: list, vocab_size: int):
    """``step()``: forward, backward and AdamW of a fresh model on ``batches`` in turn (no data, EMA or
    logging): what the training loop and the loader are measured against."""
    from transfusion_mot import flow
    from transfusion_mot.components.optim import build_optimizer
    from transfusion_mot.model import build_model

    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size)
    opt = build_optimizer(model, cfg.optim)
    state = {"i": 0}

    def step() -> None:
        batch = batches[state["i"] % len(batches)]
        state["i"] += 1
        flow.loss_parts(model, batch, cfg.flow, seed=0).total(cfg.flow.loss_weight).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step
