"""Training entry point: ``accelerate launch -m transfusion_mot.train --config configs/X.yaml key=value``.

The loop reads top to bottom: build -> resume -> loop {accumulate, clip, step, EMA, log, eval,
sample, save} -> export. Losses are normalised by the *global* number of text targets and latent
elements of the step (all ranks, all micro-batches), so N processes compute exactly what one
process computes on the same global batch. The model is parallelised from outside (DDP or FSDP2,
components/parallel.py); the run directory is locked and checkpoints are verified (components/rundir.py,
resume.py, checkpoint.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

from . import flow, next_token
from .components.checkpoint import Snapshot, TrainState, export_model
from .components.ema import EMA
from .components.optim import build_optimizer, build_scheduler
from .components.parallel import Engine, EvalCopy
from .components.resume import Checkpointer, last_good
from .components.rundir import claim
from .components.tracking import MetricsLog, hparams, log_image, log_line, plot_losses, tracker_names
from .config import Config, ConfigError, load_config
from .data.packing import IGNORE, Specials
from .data.pipeline import build_records, build_stream
from .hub import add_parts, add_results
from .model import build_model, model_vocab_size, untie_from_dense


class Stop(Exception):
    """Raised to end a run early with a clear message (non-finite losses)."""


def build_engine(cfg: Config, run_dir: Path) -> Engine:
    """accelerate with the trackers ``train.report_to`` names (a missing package stops here, in one line)."""
    return Engine(cfg, str(run_dir), tracker_names(cfg.train.report_to))


def setup_model(cfg: Config, vocab_size: int, engine: Engine):
    """The model, parallelised (DDP wrapper or FSDP2 shards), then its optimizer and schedule."""
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
    model = engine.prepare_model(model)  # FSDP2 replaces the parameters: the optimizer comes after
    # fused AdamW: one kernel per step. On DTensors the foreach path dispatches every op through DTensor
    # (measured at the debug size on 2 CPU processes: 46 ms per step against 2.5 ms fused).
    fused = torch.cuda.is_available() or engine.mode == "fsdp"
    opt = build_optimizer(engine.unwrap_model(model), cfg.optim, fused=fused)
    sched = build_scheduler(opt, cfg.optim, cfg.train.steps)
    return model, opt, sched


def compile_blocks(model, backend: str = "inductor") -> None:
    """``torch.compile`` every block, whole: routing is computed once per batch outside the blocks and
    passed in (its host syncs stay out of the graph), so a MoT or dense block is one graph with no break
    (``fullgraph``), shared by every layer, and dynamic in the group sizes that change from batch to
    batch. MoE's data-dependent expert routing may break its graph, so it is not forced to be whole."""
    fullgraph = model.cfg.arch != "moe"
    for block in model.backbone.blocks:
        block.compile(backend=backend, fullgraph=fullgraph, dynamic=None)  # group sizes: Routing.mark_dynamic


def micro_batches(stream, n: int, device) -> list:
    return [next(stream).to(device) for _ in range(n)]


def global_counts(batches: list, accelerator: Accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """Text targets and latent elements of the whole step, summed over micro-batches and ranks."""
    lm = sum(int((b.text_targets != IGNORE).sum()) for b in batches)
    fl = sum(b.flow_elements() for b in batches)
    counts = torch.tensor([lm, fl], dtype=torch.float64, device=accelerator.device)
    counts = accelerator.reduce(counts, reduction="sum")
    return counts[0].float().clamp(min=1), counts[1].float().clamp(min=1)


def train_step(model, batches: list, cfg: Config, accelerator: Accelerator, seed: int) -> dict:
    """Forward/backward over the step's micro-batches; returns the step's global losses."""
    lm_denom, flow_denom = global_counts(batches, accelerator)
    world = accelerator.num_processes
    objective = next_token.loss_parts if cfg.model.setting == "chameleon" else flow.loss_parts
    totals = torch.zeros(3, device=accelerator.device)  # lm, flow, aux
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        ctx = accelerator.no_sync(model) if not last else _nullcontext()
        with ctx, accelerator.autocast():
            parts = objective(model, batch, cfg.flow, seed)
            loss = parts.total(cfg.flow.loss_weight, 0.0, lm_denom, flow_denom)
            # DDP averages gradients over ranks: the LM / flow sums are over the global counts, so they are
            # scaled back up by world; the MoE aux loss is each rank's own mean, so DDP's average is its weight.
            aux = parts.aux * (cfg.model.moe_aux_weight / len(batches))
            accelerator.backward(loss * world + aux)
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
    engine = build_engine(cfg, run_dir)
    try:
        with claim(run_dir, cfg.train, engine), StopSignals() as stop:  # the run dir is ours until the end
            return _train(cfg, engine, run_dir, stop, evaluate_at_end)
    finally:
        engine.release()


@dataclass
class Run:
    """What the loop works with, built (and resumed) by ``build_run``."""

    model: torch.nn.Module  # parallelised: DDP wrapper or FSDP2-sharded root
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    ema: EMA | None
    ckpt: Checkpointer
    log: MetricsLog
    stream: object  # BatchStream (map-style) or ShardBatchStream (shards)
    evaluator: object
    eval_model: EvalCopy  # eval_model(model, ema): the weights to evaluate / export, on the main process


def build_run(cfg: Config, engine: Engine, run_dir: Path) -> Run:
    """build -> resume: data, codec, model (parallelised), optimizer, EMA (after sharding), checkpoint state."""
    from .data.pipeline import prepare_codec, prepare_tokenizer
    from .evaluate import Evaluator

    if engine.is_main_process:
        cfg.save(run_dir / "config.yaml")
        engine.text_log = run_dir / "train.log"  # from here on, what the run prints is also written there
    tokenizer = prepare_tokenizer(cfg)
    model_vocab_size(cfg.model, tokenizer.vocab_size)  # a model.vocab_size too small for it stops here
    specials = Specials.of(tokenizer)
    records = build_records(cfg.data, "train")
    codec, encode = prepare_codec(cfg, run_dir, engine, records)
    set_seed(cfg.train.seed)  # the initial weights must not depend on whether a VAE was just trained
    model, opt, sched = setup_model(cfg, tokenizer.vocab_size, engine)
    single = engine.unwrap_model(model)
    ema = EMA(single, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=engine.is_main_process)
    ckpt = Checkpointer(cfg, engine, run_dir, Snapshot(single, opt, ema, TrainState()), sched, log)
    ckpt.resume()
    if engine.is_main_process and engine.log_with:  # TensorBoard: run_dir/tb; wandb: project cfg.name
        engine.init_trackers("tb" if cfg.train.report_to == "tensorboard" else cfg.name,
                             config=hparams(cfg.to_dict()))
    stream = build_stream(records, tokenizer, encode, cfg, specials, engine.process_index, engine.num_processes,
                          start=ckpt.snap.state.next_batch, state=ckpt.snap.state.data, report=engine.print,
                          gather=gather_object if engine.num_processes > 1 else None)
    log.write({"step": ckpt.snap.state.step, "setup": {"parallel": engine.mode, "precision": engine.precision,
               "processes": engine.num_processes, "param_type": type(next(single.parameters())).__name__}})
    engine.print(f"{cfg.name}: {cfg.model.arch} model, {single.num_params() / 1e6:.2f}M parameters, "
                 f"{cfg.train.steps} steps, {engine.mode} over {engine.num_processes} process(es), "
                 f"precision {engine.precision}, run dir {run_dir}")
    if ema is not None and (note := ema.warmup_note(cfg.train.steps)):
        engine.print(note)
    return Run(model, opt, sched, ema, ckpt, log, stream, Evaluator(cfg, tokenizer, codec, run_dir, engine),
               EvalCopy(lambda: build_model(cfg.model, tokenizer.vocab_size), engine))


def _train(cfg: Config, engine: Engine, run_dir: Path, stop: "StopSignals", evaluate_at_end: bool) -> Path:
    # --- build, resume ---
    run = build_run(cfg, engine, run_dir)
    model, opt, sched, ema, state = run.model, run.opt, run.sched, run.ema, run.ckpt.snap.state
    stream = run.stream

    # --- loop ---
    bar = tqdm(total=cfg.train.steps, initial=state.step, disable=not engine.is_main_process,
               desc="train", dynamic_ncols=True)
    t_last, tokens = time.time(), 0
    model.train()
    while state.step < cfg.train.steps:
        batches = micro_batches(stream, cfg.train.grad_accum, engine.device)
        state.next_batch = stream.next_index
        losses = train_step(model, batches, cfg, engine, seed=cfg.train.seed)
        tokens += sum(int((b.doc_id >= 0).sum()) for b in batches) * engine.num_processes
        grad_norm = float(engine.clip_grad_norm_(model.parameters(), cfg.optim.clip))  # global, unscaled
        if not (math.isfinite(losses["loss"]) and math.isfinite(grad_norm)):
            opt.zero_grad(set_to_none=True)
            skip_step(state, losses["loss"], engine, cfg, run_dir)
            continue
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if engine.scaler is not None:
            engine.scaler.update(finite=True)
        if ema is not None:
            ema.update()
        state.step += 1
        state.bad_steps = 0
        state.last_loss = losses["loss"]
        state.examples_seen += sum(int(b.doc_id.max()) + 1 for b in batches) * engine.num_processes  # documents
        bar.update(1)

        if state.step % cfg.train.log_every == 0 or state.step == cfg.train.steps:
            log_step(run, engine, state, losses, grad_norm, tokens / max(time.time() - t_last, 1e-9))
            flow_shown = {} if cfg.model.setting == "chameleon" else {"flow": f"{losses['loss_flow']:.4f}"}
            bar.set_postfix(lm=f"{losses['loss_lm']:.3f}", **flow_shown)  # chameleon: one next-token loss
            t_last, tokens = time.time(), 0
        if state.step < cfg.train.steps:
            periodic_eval(run, cfg, engine, state.step, run_dir)
        signalled = stop.agreed(engine)
        pause = signalled or (cfg.train.stop_after and state.step >= cfg.train.stop_after)
        if pause or (cfg.train.save_every and state.step % cfg.train.save_every == 0):
            state.data = stream.state_dict()  # a shard stream's lanes, gathered from every rank
            run.ckpt.save()
        if pause and state.step < cfg.train.steps:
            why = signalled or f"train.stop_after={cfg.train.stop_after}"
            engine.print(f"{why}: saved step {state.step} and stopped; continue with --resume auto")
            bar.close()
            engine.end_training()
            return run_dir
    bar.close()
    if stream.skips.total:
        engine.print(stream.skips.report())

    # --- end: checkpoint, export, evaluate ---
    if run.ckpt.last_saved != state.step:  # not when resumed at the final step
        state.data = stream.state_dict()
        run.ckpt.save()
    finish(run, cfg, engine, run_dir, state.step, evaluate_at_end)
    return run_dir


def log_step(run: Run, engine: Engine, state: TrainState, losses: dict, grad_norm: float, tokens_per_s: float) -> None:
    """One logged step: metrics.jsonl, the trackers and the run's text log."""
    record = {"step": state.step, **losses, "lr": run.sched.get_last_lr()[0], "grad_norm": grad_norm,
              "tokens_per_s": tokens_per_s, "examples": state.examples_seen, "skipped_steps": state.skipped_steps,
              "nonfinite_grads": state.nonfinite_grads, "skipped_records": run.stream.skips.total}
    run.log.write(record)
    engine.log({k: v for k, v in record.items() if k != "step"}, step=state.step)
    if engine.text_log is not None:
        with open(engine.text_log, "a") as f:
            print(log_line(record), file=f)


def periodic_eval(run: Run, cfg: Config, engine: Engine, step: int, run_dir: Path) -> None:
    """In-run validation every ``train.eval_every`` steps and a quick sample grid every ``train.sample_every``."""
    if cfg.train.eval_every and step % cfg.train.eval_every == 0:
        val = run.evaluator.validation(run.eval_model(run.model, run.ema))  # per-t flow losses included
        run.log.write({"step": step, **val})
        engine.log(val, step=step)
    if cfg.train.sample_every and step % cfg.train.sample_every == 0:
        quick = run.evaluator.sample_grid(run.eval_model(run.model, run.ema), tag=f"step{step:06d}", quick=True)
        if "prompt_following" in quick:
            run.log.write({"step": step, "prompt_following": quick["prompt_following"]})
            engine.log({"prompt_following": quick["prompt_following"]}, step=step)
        if engine.is_main_process:
            log_image(engine.trackers, "samples", run_dir / f"samples_step{step:06d}.png", step)


def exported_config(cfg: Config) -> Config:
    """The config a model folder carries: trained on encoded shards, its codec is the one that made them."""
    from .data.encode import latents_codec_config
    from .data.sources import SOURCES

    if not SOURCES[cfg.data.source].encoded:
        return cfg
    return dataclasses.replace(cfg, codec=latents_codec_config(cfg))


def finish(run: Run, cfg: Config, engine: Engine, run_dir: Path, step: int, evaluate_at_end: bool) -> None:
    """Export the self-contained model folder, plot, and (unless told not to) the final evaluation."""
    final = run.eval_model(run.model, run.ema)  # gathered under FSDP2: every rank takes part
    evaluator, log = run.evaluator, run.log
    if engine.is_main_process:  # the self-contained model folder (hub.py): weights, config, tokenizer, codec, card
        out = exported_config(cfg)
        export_model(final, out, run_dir / "model", parts=lambda folder: add_parts(
            folder, out, evaluator.tokenizer, evaluator.codec, run_dir=run_dir))
        plot_losses(log.read(), run_dir / "loss_curves.png", title=f"{cfg.name} ({cfg.model.arch})")
    if evaluate_at_end:
        summary = evaluator.final(final, log)
        if engine.is_main_process:
            add_results(run_dir / "model", cfg, run_dir)  # the card gets the metrics and the sample grid
            log_image(engine.trackers, "samples", run_dir / "samples_final.png", step)
            plot_losses(log.read(), run_dir / "loss_curves.png", title=f"{cfg.name} ({cfg.model.arch})")
            engine.print(summary)
    engine.wait_for_everyone()
    engine.end_training()


def skip_step(state: TrainState, loss: float, engine: Engine, cfg: Config, run_dir: Path) -> None:
    """A step with a non-finite loss or gradient norm is not applied; too many in a row stop the run.
    Under fp16 a finite loss with overflowing gradients is the loss scaler's business (scale halved)."""
    scaler = engine.scaler
    if scaler is not None and math.isfinite(loss) and scaler.scale >= 1.0:
        scaler.update(finite=False)
        state.overflow_steps += 1
        return
    state.bad_steps += 1
    state.skipped_steps += 1
    state.nonfinite_grads += math.isfinite(loss)
    if state.bad_steps >= cfg.train.max_bad_steps:
        what = "gradient norms" if math.isfinite(loss) else "losses"
        raise Stop(f"{state.bad_steps} consecutive steps with non-finite {what} at step {state.step}; stopping. "
                   + last_good(engine, run_dir))


class StopSignals:
    """SIGTERM and SIGINT (Ctrl-C) ask the loop to save and stop after the current step; a second
    Ctrl-C interrupts at once. The ranks agree (one small all-reduce per step), so a signal to one
    process stops them all at the same step."""

    def __enter__(self):
        self.hit = ""
        self._previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in self._previous:
            signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.hit and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.hit = signal.Signals(signum).name

    def agreed(self, engine: Engine) -> str:
        if engine.num_processes > 1:
            hit = engine.reduce(torch.tensor(float(bool(self.hit)), device=engine.device), "sum")
            return (self.hit or "a signal to another process") if float(hit) else ""
        return self.hit

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False


def main(argv: list[str] | None = None) -> None:
    """The entry ``accelerate launch -m transfusion_mot.train`` runs: config and data errors end in one line
    (``error: ...``, exit 2) on every rank, as through the ``transfusion-mot`` command."""
    parser = argparse.ArgumentParser(prog="transfusion_mot.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML file in configs/")
    parser.add_argument("--resume", default=None, help="'auto' or a checkpoint folder (= train.resume)")
    parser.add_argument("--overwrite", action="store_true", help="start over in a run dir that holds a run "
                        "(deletes its checkpoints, model and metrics; = train.overwrite=true)")
    parser.add_argument("--allow-config-change", action="store_true", help="resume even if the data order "
                        "changes (recorded in metrics.jsonl; = train.allow_config_change=true)")
    parser.add_argument("--no-eval", action="store_true", help="skip the final sampling and evaluation")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.dim=64 train.steps=100")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    overrides += ["train.overwrite=true"] * args.overwrite
    overrides += ["train.allow_config_change=true"] * args.allow_config_change
    try:
        cfg = load_config(args.config, overrides)
        train(cfg, evaluate_at_end=not args.no_eval)
    except Stop as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except (ValueError, FileNotFoundError) as e:  # config, run dir, checkpoint and data errors: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
