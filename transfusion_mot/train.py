"""Training entry point: ``accelerate launch -m transfusion_mot.train --config configs/X.yaml key=value``.

The loop reads top to bottom: build -> resume -> loop {accumulate, clip, step, EMA, log, eval,
sample, save} -> export. Losses are normalised by the *global* number of text targets and latent
elements of the step (all ranks, all micro-batches), so N processes compute exactly what one
process computes on the same global batch.
"""
from __future__ import annotations

import argparse
import importlib
import math
import signal
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from . import flow
from .components.checkpoint import TrainState, export_model, resolve_resume, save_checkpoint
from .components.ema import EMA
from .components.optim import build_optimizer, build_scheduler
from .components.tracking import MetricsLog, plot_losses
from .config import Config, ConfigError, load_config
from .data.packing import IGNORE, Specials
from .data.pipeline import BatchStream, ExampleSource, build_records
from .model import build_model, untie_from_dense


class Stop(Exception):
    """Raised to end a run early with a clear message (non-finite losses)."""


def build_accelerator(cfg: Config, run_dir: Path) -> Accelerator:
    mp = cfg.train.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() else "no"
    trackers = []
    try:
        import tensorboard  # noqa: F401

        trackers = ["tensorboard"]
    except ImportError:
        pass
    # step_scheduler_with_optimizer=False: accelerate would otherwise step the schedule once per process
    # per optimizer step (it assumes each process sees 1/N of the batches), so N processes would run an
    # N-times faster warmup/cosine than one process on the same global batch (caught by the 2-process test).
    return Accelerator(mixed_precision=mp, log_with=trackers or None, project_dir=str(run_dir),
                       step_scheduler_with_optimizer=False)


def setup_model(cfg: Config, vocab_size: int, accelerator: Accelerator):
    model = build_model(cfg.model, vocab_size)
    if cfg.train.upcycle_from:
        from .components.checkpoint import load_exported

        dense_cfg, state = load_exported(Path(cfg.train.upcycle_from) / "model")
        dense = build_model(dense_cfg.model, vocab_size)
        dense.load_state_dict(state)
        untie_from_dense(model, dense)
    model.backbone.checkpointing = cfg.train.activation_checkpointing
    if cfg.train.compile:
        compile_blocks(model)
    opt = build_optimizer(model, cfg.optim, fused=torch.cuda.is_available())
    sched = build_scheduler(opt, cfg.optim, cfg.train.steps)
    return model, opt, sched


def compile_blocks(model, backend: str = "inductor") -> None:
    """``torch.compile`` every block, whole: routing is computed once per batch outside the blocks and
    passed in (its host syncs stay out of the graph), so a MoT or dense block is one graph with no break
    (``fullgraph``), shared by every layer, and dynamic in the group sizes that change from batch to
    batch. MoE's data-dependent expert routing may break its graph, so it is not forced to be whole."""
    fullgraph = model.cfg.arch != "moe"
    for block in model.backbone.blocks:
        block.compile(backend=backend, fullgraph=fullgraph, dynamic=True)


def micro_batches(stream: BatchStream, n: int, device) -> list:
    return [next(stream).to(device) for _ in range(n)]


def global_counts(batches: list, accelerator: Accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """Text targets and latent elements of the whole step, summed over micro-batches and ranks."""
    lm = sum(int((b.text_targets != IGNORE).sum()) for b in batches)
    fl = sum(b.latents.numel() for b in batches)
    counts = torch.tensor([lm, fl], dtype=torch.float64, device=accelerator.device)
    counts = accelerator.reduce(counts, reduction="sum")
    return counts[0].float().clamp(min=1), counts[1].float().clamp(min=1)


def train_step(model, batches: list, cfg: Config, accelerator: Accelerator, seed: int) -> dict:
    """Forward/backward over the step's micro-batches; returns the step's global losses."""
    lm_denom, flow_denom = global_counts(batches, accelerator)
    world = accelerator.num_processes
    totals = torch.zeros(3, device=accelerator.device)  # lm, flow, aux
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        ctx = accelerator.no_sync(model) if not last else _nullcontext()
        with ctx, accelerator.autocast():
            parts = flow.loss_parts(model, batch, cfg.flow, seed)
            loss = parts.total(cfg.flow.loss_weight, cfg.model.moe_aux_weight / len(batches), lm_denom, flow_denom)
            accelerator.backward(loss * world)  # DDP averages over ranks; our sums already are global
        totals += torch.stack([parts.lm_sum.detach() / lm_denom, parts.flow_sum.detach() / flow_denom,
                               parts.aux.detach() / len(batches)])
    totals = accelerator.reduce(totals, reduction="sum")
    return {"loss_lm": float(totals[0]), "loss_flow": float(totals[1]), "aux": float(totals[2]) / world,
            "loss": float(totals[0] + cfg.flow.loss_weight * totals[1])}


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def check_attention(cfg: Config) -> None:
    """``model.attention=flex`` where this torch cannot run it is a config error, before any work."""
    if cfg.model.attention != "flex":
        return
    try:
        importlib.import_module("torch.nn.attention.flex_attention")  # torch >= 2.5
    except ImportError:
        raise ConfigError(f"model.attention=flex: this torch ({torch.__version__}) has no flex attention "
                          "(torch.nn.attention.flex_attention, torch >= 2.5); use model.attention=sdpa") from None


def train(cfg: Config, evaluate_at_end: bool = True) -> Path:
    check_attention(cfg)
    run_dir = Path(cfg.train.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    accelerator = build_accelerator(cfg, run_dir)
    set_seed(cfg.train.seed)
    if accelerator.is_main_process:
        cfg.save(run_dir / "config.yaml")
    from .data.pipeline import prepare_codec, prepare_tokenizer

    # --- build ---
    tokenizer = prepare_tokenizer(cfg)
    specials = Specials.of(tokenizer)
    records = build_records(cfg.data, "train")
    codec, encode = prepare_codec(cfg, run_dir, accelerator, records)
    model, opt, sched = setup_model(cfg, tokenizer.vocab_size, accelerator)
    ema = EMA(model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    model, opt, sched = accelerator.prepare(model, opt, sched)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=accelerator.is_main_process)

    # --- resume ---
    ckpt = resolve_resume(cfg.train.resume, run_dir)
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        log.truncate_after(state.step)
        accelerator.print(f"resumed from {ckpt} at step {state.step}")
    elif accelerator.is_main_process:
        log.path.unlink(missing_ok=True)
    if accelerator.is_main_process and accelerator.log_with:
        accelerator.init_trackers("tb", config={"name": cfg.name})
    source = ExampleSource(records, tokenizer, cfg,
                           accelerator.process_index, accelerator.num_processes)
    stream = BatchStream(source, encode, cfg, specials, start=state.next_batch, report=accelerator.print)
    from .evaluate import Evaluator

    evaluator = Evaluator(cfg, tokenizer, codec, run_dir, accelerator)

    stop_signal = {"hit": False}
    signal.signal(signal.SIGTERM, lambda *_: stop_signal.__setitem__("hit", True))
    n_params = accelerator.unwrap_model(model).num_params()
    accelerator.print(f"{cfg.name}: {cfg.model.arch} model, {n_params / 1e6:.2f}M parameters, "
                      f"{cfg.train.steps} steps, run dir {run_dir}")

    # --- loop ---
    bar = tqdm(total=cfg.train.steps, initial=state.step, disable=not accelerator.is_main_process,
               desc="train", dynamic_ncols=True)
    t_last, tokens = time.time(), 0
    model.train()
    while state.step < cfg.train.steps:
        batches = micro_batches(stream, cfg.train.grad_accum, accelerator.device)
        state.next_batch = stream.next_index
        losses = train_step(model, batches, cfg, accelerator, seed=cfg.train.seed)
        tokens += sum(int((b.doc_id >= 0).sum()) for b in batches) * accelerator.num_processes
        if not math.isfinite(losses["loss"]):
            opt.zero_grad(set_to_none=True)
            state.bad_steps += 1
            state.skipped_steps += 1
            if state.bad_steps >= cfg.train.max_bad_steps:
                raise Stop(f"{state.bad_steps} consecutive non-finite losses at step {state.step}; stopping. "
                           f"The last good checkpoint in {run_dir / 'checkpoints'} is intact (--resume auto).")
            continue
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.clip) if cfg.optim.clip else torch.zeros(())
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(accelerator.unwrap_model(model))
        state.step += 1
        state.bad_steps = 0
        state.examples_seen += sum(b.n_images for b in batches) * accelerator.num_processes
        bar.update(1)

        if state.step % cfg.train.log_every == 0 or state.step == cfg.train.steps:
            dt = time.time() - t_last
            record = {"step": state.step, **losses, "lr": sched.get_last_lr()[0],
                      "grad_norm": float(grad_norm), "tokens_per_s": tokens / max(dt, 1e-9),
                      "examples": state.examples_seen, "skipped_steps": state.skipped_steps,
                      "skipped_records": stream.skips.total}
            log.write(record)
            accelerator.log({k: v for k, v in record.items() if k != "step"}, step=state.step)
            bar.set_postfix(lm=f"{losses['loss_lm']:.3f}", flow=f"{losses['loss_flow']:.4f}")
            t_last, tokens = time.time(), 0
        if cfg.train.eval_every and state.step % cfg.train.eval_every == 0 and state.step < cfg.train.steps:
            log.write({"step": state.step, **evaluator.validation(_eval_model(ema, model, accelerator))})
        if cfg.train.sample_every and state.step % cfg.train.sample_every == 0 and state.step < cfg.train.steps:
            quick = evaluator.sample_grid(_eval_model(ema, model, accelerator), tag=f"step{state.step:06d}", quick=True)
            if "prompt_following" in quick:
                log.write({"step": state.step, "prompt_following": quick["prompt_following"]})
        pause = stop_signal["hit"] or (cfg.train.stop_after and state.step >= cfg.train.stop_after)
        if pause or (cfg.train.save_every and state.step % cfg.train.save_every == 0):
            save_checkpoint(accelerator, run_dir, state.step, cfg, keep=cfg.train.keep_checkpoints)
        if pause and state.step < cfg.train.steps:
            why = "SIGTERM" if stop_signal["hit"] else f"train.stop_after={cfg.train.stop_after}"
            accelerator.print(f"{why}: saved step {state.step} and stopped; continue with train.resume=auto")
            bar.close()
            accelerator.end_training()
            return run_dir
    bar.close()
    if stream.skips.total:
        accelerator.print(stream.skips.report())

    # --- end: checkpoint, export, evaluate ---
    save_checkpoint(accelerator, run_dir, state.step, cfg, keep=cfg.train.keep_checkpoints)
    final = _eval_model(ema, model, accelerator)
    if accelerator.is_main_process:
        export_model(final, cfg, run_dir / "model")
        plot_losses(log.read(), run_dir / "loss_curves.png", title=f"{cfg.name} ({cfg.model.arch})")
    if evaluate_at_end:
        summary = evaluator.final(final, log)
        if accelerator.is_main_process:
            plot_losses(log.read(), run_dir / "loss_curves.png", title=f"{cfg.name} ({cfg.model.arch})")
            accelerator.print(summary)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir


def _eval_model(ema: EMA | None, model, accelerator: Accelerator):
    return ema.model if ema is not None else accelerator.unwrap_model(model)


def main(argv: list[str] | None = None) -> None:
    """The entry ``accelerate launch -m transfusion_mot.train`` runs: config and data errors end in one line
    (``error: ...``, exit 2) on every rank, as through the ``transfusion-mot`` command."""
    parser = argparse.ArgumentParser(prog="transfusion_mot.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML file in configs/")
    parser.add_argument("--resume", default=None, help="'auto' or a checkpoint folder (= train.resume)")
    parser.add_argument("--no-eval", action="store_true", help="skip the final sampling and evaluation")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.dim=64 train.steps=100")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    try:
        cfg = load_config(args.config, overrides)
        train(cfg, evaluate_at_end=not args.no_eval)
    except Stop as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except (ValueError, FileNotFoundError) as e:  # ConfigError and bad data: named in one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
