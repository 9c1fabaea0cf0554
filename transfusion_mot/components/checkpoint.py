"""Checkpoints (everything stateful, one way, atomically) and the exported model (safetensors + json).

Layout of a run directory::

    config.yaml                  resolved config
    checkpoints/step_000100/     accelerate save_state: model, optimizer, scheduler, EMA, TrainState, RNG
    model/model.safetensors      exported weights (EMA when enabled) + model/config.json
    vae/                         the codec the run used, when it trained its own

A checkpoint is written to ``step_N.tmp`` and renamed when complete, so a crash mid-save leaves the
previous checkpoint untouched and ``latest_checkpoint`` never returns a partial one.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class TrainState:
    """The loop's own counters; registered with accelerate so it is saved with the rest."""

    step: int = 0  # optimizer steps done
    bad_steps: int = 0  # consecutive non-finite losses
    skipped_steps: int = 0  # non-finite losses skipped in total
    examples_seen: int = 0
    next_batch: int = 0  # data position: index of the next batch the stream yields
    data: dict = field(default_factory=dict)  # a shard stream's position (data/streaming.py); {} for map-style

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """Newest complete checkpoint (``*.tmp`` folders are incomplete saves and are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return max(done)[1] if done else None


def save_checkpoint(accelerator, run_dir: str | Path, step: int, config, keep: int = 2) -> Path:
    """accelerate ``save_state`` into a temp folder, then an atomic rename; prune old ones."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        config.save(tmp / "config.yaml")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        done = sorted(p for p in final.parent.iterdir() if _STEP_DIR.match(p.name))
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(resume: str, run_dir: str | Path) -> Path | None:
    """'' -> None; 'auto' -> newest complete checkpoint of the run (or None); else that folder."""
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if not path.is_dir() or path.name.endswith(".tmp"):
        raise FileNotFoundError(f"train.resume={resume!r}: not a complete checkpoint folder")
    return path


def export_model(model: torch.nn.Module, config, out_dir: str | Path) -> Path:
    """Weights as safetensors + the resolved config as json: what ``from_pretrained`` reads."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp / "model.safetensors")
    (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=list))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def load_exported(model_dir: str | Path):
    """(config, state_dict) of an exported model folder, with errors that name the missing file."""
    from ..config import config_from_dict

    model_dir = Path(model_dir)
    for name in ("config.json", "model.safetensors"):
        if not (model_dir / name).exists():
            raise FileNotFoundError(f"{model_dir / name} is missing: not an exported transfusion_mot model "
                                    f"(a run directory holds one in model/)")
    cfg = config_from_dict(json.loads((model_dir / "config.json").read_text()))
    return cfg, load_file(model_dir / "model.safetensors")
