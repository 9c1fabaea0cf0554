"""Checkpoints (everything stateful, one way, verified, no pickles) and the exported model.

A checkpoint ``checkpoints/step_000100/``::

    state/shard-0000R-model-00001-of-00001.safetensors  model, optimizer moments, EMA: rank R's shards
    rng/rank_R.safetensors + rng/rank_R.json            rank R's torch / CUDA / numpy / python RNG states
    train_state.json                                    counters, data position, the run's layout (world
                                                        size, batch), loss scale, optimizer hyper-parameters
    config.yaml                                         the resolved config of the run that wrote it
    manifest.json                                       size and sha256 of every file above; written last

It is written to ``step_N.tmp`` and renamed when complete, so a crash mid-save leaves the previous
checkpoint untouched. Resume verifies the manifest first (``verify``) and never unpickles anything.

Why this layout. torch distributed checkpointing (DCP) saves each rank's shards and reshards on load,
but its default FileSystemWriter stores the checkpoint's ``.metadata`` as a pickle that the default
reader unpickles: resuming a copied run would run its code (the issue this replaces: accelerate's
``custom_checkpoint_*.pkl`` loaded with ``weights_only=False``). DCP's HuggingFaceStorageWriter with
``save_distributed=True`` writes every rank's shards as safetensors with their offsets in the file
header, and HuggingFaceStorageReader rebuilds the metadata from those headers, so loading reads tensors
and JSON only (a crafted ``.metadata`` pickle in the folder is never opened: tested). It reshards too (a
two-process checkpoint loads into one process), and it holds tensors only, so the rest (optimizer
hyper-parameters, counters, loss scale, python/numpy RNG) is JSON. Cost, measured for the ``small`` size
(9.9M parameters, 119 MB with Adam's moments) in one process on the 2-core VM under load: save 5.8-6.1 s,
0.5 s of it hashing for the manifest, against 0.9-2.6 s for ``torch.save`` of the same state (the
safetensors writer serialises each file in memory before writing it); verify 0.5 s, load 3.9-5.9 s. A
checkpoint every few hundred steps affords that; on N ranks each writes and hashes only its share.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import random
import re
import shutil
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_STEP_DIR = re.compile(r"^step_(\d+)$")
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".metadata")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: the message names it and why."""


@dataclass
class TrainState:
    """The loop's own counters, saved as JSON in every checkpoint."""

    step: int = 0  # optimizer steps done
    bad_steps: int = 0  # consecutive skipped steps (non-finite loss or gradient norm)
    skipped_steps: int = 0  # non-finite losses and gradient norms skipped in total
    nonfinite_grads: int = 0  # of those, steps whose loss was finite but gradient norm was not
    overflow_steps: int = 0  # fp16 steps skipped by the loss scaler (not counted as bad)
    examples_seen: int = 0
    next_batch: int = 0  # data position: index of the next batch the stream yields
    data: dict = field(default_factory=dict)  # a shard stream's position (data/streaming.py); {} for map-style
    ema_updates: int = 0
    last_loss: float = float("nan")  # the last applied step's loss

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, state: dict) -> "TrainState":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in state.items() if k in names})


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """``step_N`` folders, newest first (``*.tmp`` folders are unfinished saves and are not listed)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def read_manifest(ckpt: Path) -> dict | None:
    try:
        manifest = json.loads((ckpt / "manifest.json").read_text())
        return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------------
# Hashing, spread over the ranks (each hashes its share of the files)
# --------------------------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _spread(engine, items: list, fn) -> list:
    """``[fn(x) for x in items]`` with each rank computing every world-th item; all ranks get the list."""
    rank, world = (engine.process_index, engine.num_processes) if engine is not None else (0, 1)
    mine = {i: fn(items[i]) for i in range(rank, len(items), world)}
    if world > 1:
        import torch.distributed as dist

        parts: list = [None] * world
        dist.all_gather_object(parts, mine)  # our own in-process values, never a file
        for part in parts:
            mine.update(part)
    return [mine[i] for i in range(len(items))]


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def verify(ckpt: Path, engine=None) -> str | None:
    """None when every file the manifest lists is there with its size and sha256 and nothing else is;
    else the first problem, in words. Every rank calls it (the hashing is shared)."""
    if not ckpt.is_dir():
        return "not a folder"
    files = _files(ckpt)
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickles:
        return f"holds {pickles[0]}: a pickle file, never loaded (unpickling can run code)"
    manifest = read_manifest(ckpt)
    if manifest is None:
        return "has no readable manifest.json (an unfinished save, or written by an older version)"
    listed = manifest["files"]
    extra = [f for f in files if f not in listed and f != "manifest.json"]
    if extra:
        return f"holds {extra[0]}, which its manifest does not list"

    def check(name: str) -> str | None:
        path, want = ckpt / name, listed[name]
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want.get("size"):
            return f"{name} has {path.stat().st_size} bytes, the manifest says {want.get('size')} (truncated?)"
        if sha256(path) != want.get("sha256"):
            return f"{name} does not match its sha256 in the manifest (changed or corrupted)"
        return None

    problems = [p for p in _spread(engine, sorted(listed), check) if p]
    return problems[0] if problems else None


# --------------------------------------------------------------------------------------------------
# RNG states as tensors + JSON
# --------------------------------------------------------------------------------------------------
def _write_rng(folder: Path, rank: int) -> None:
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    save_file(tensors, folder / f"rank_{rank}.safetensors")
    version, state, gauss_next = random.getstate()
    (folder / f"rank_{rank}.json").write_text(json.dumps(
        {"python": [version, list(state), gauss_next], "numpy": [kind, int(pos), int(has_gauss), float(gauss)]}))


def _read_rng(folder: Path, rank: int) -> None:
    import numpy as np

    if not (folder / f"rank_{rank}.safetensors").exists():  # a checkpoint of fewer ranks: keep this rank's
        return
    tensors = load_file(folder / f"rank_{rank}.safetensors")
    extra = json.loads((folder / f"rank_{rank}.json").read_text())
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, gauss = extra["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, state, gauss_next = extra["python"]
    random.setstate((version, tuple(state), gauss_next))


# --------------------------------------------------------------------------------------------------
# What is saved: model, optimizer, EMA (tensors, sharded) and the loop state (JSON)
# --------------------------------------------------------------------------------------------------
@dataclass
class Snapshot:
    model: torch.nn.Module  # the single-device module, or the FSDP2-sharded root (never a DDP wrapper)
    optimizer: torch.optim.Optimizer
    ema: object | None
    state: TrainState

    def tensors(self, with_ema: bool = True) -> dict[str, torch.Tensor]:
        """One flat dict of (possibly sharded) tensors: ``model.*``, ``optim.<param>.<moment>``, ``ema.*``."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        flat = {f"model.{k}": v for k, v in model_sd.items()}
        for name, moments in optim_sd["state"].items():
            flat.update({f"optim.{name}.{k}": v for k, v in moments.items() if isinstance(v, torch.Tensor)})
        if self.ema is not None and with_ema:
            flat.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        return flat

    def load_tensors(self, flat: dict[str, torch.Tensor]) -> None:
        """Put loaded tensors back. Optimizer hyper-parameters stay the current config's (see train.py)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        _, optim_sd = get_state_dict(self.model, self.optimizer)
        moments: dict[str, dict] = {}
        for key, value in flat.items():
            if key.startswith("optim."):
                name, k = key[len("optim."):].rsplit(".", 1)
                moments.setdefault(name, {})[k] = value
        set_state_dict(self.model, self.optimizer,
                       model_state_dict={k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")},
                       optim_state_dict={"state": moments, "param_groups": optim_sd["param_groups"]})
        if self.ema is not None:
            ema = {k[len("ema."):]: v for k, v in flat.items() if k.startswith("ema.")}
            if ema:
                self.ema.load_state_dict(ema)


def save_checkpoint(engine, run_dir: str | Path, snap: Snapshot, config, meta: dict) -> Path:
    """Every rank writes its shards and RNG into ``step_N.tmp``; the main process adds the JSON files
    and the manifest, then renames the folder into place. ``meta`` (run id, layout, loss scale, whether
    the weights and loss were finite) goes into train_state.json and the manifest."""
    import torch.distributed.checkpoint as dcp

    final = checkpoint_dir(run_dir, snap.state.step)
    tmp = final.with_name(final.name + ".tmp")
    main = engine.is_main_process
    if main and tmp.exists():
        shutil.rmtree(tmp)
    engine.wait_for_everyone()
    with _one_process_quiet():
        dcp.save(snap.tensors(), storage_writer=dcp.HuggingFaceStorageWriter(str(tmp / "state"), save_distributed=True),
                 no_dist=not _distributed())
    _write_rng(tmp / "rng", engine.process_index)
    engine.wait_for_everyone()
    names = _files(tmp) if main else []
    names = _broadcast(engine, names)
    hashes = _spread(engine, names, lambda n: sha256(tmp / n))
    if main:
        (tmp / "train_state.json").write_text(json.dumps({**snap.state.to_json(), **meta}, indent=1))
        config.save(tmp / "config.yaml")
        files = {n: {"size": (tmp / n).stat().st_size, "sha256": h} for n, h in zip(names, hashes)}
        for n in ("train_state.json", "config.yaml"):
            files[n] = {"size": (tmp / n).stat().st_size, "sha256": sha256(tmp / n)}
        manifest = {"step": snap.state.step, "files": files,
                    **{k: meta[k] for k in ("run_id", "good", "world_size") if k in meta}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        _replace_dir(tmp, final)
    engine.wait_for_everyone()
    return final


def load_checkpoint(engine, ckpt: Path, snap: Snapshot, with_ema: bool) -> dict:
    """Tensors into the (already built and sharded) model, optimizer and EMA; this rank's RNG; returns
    train_state.json. Call ``verify`` first: this reads only the files a verified manifest lists."""
    import torch.distributed.checkpoint as dcp

    flat = snap.tensors(with_ema=with_ema)
    reader = dcp.HuggingFaceStorageReader(str(ckpt / "state"))
    with _one_process_quiet():
        dcp.load(_stored_names(flat, reader), storage_reader=reader, no_dist=not _distributed())  # in place
    snap.load_tensors(flat)
    _read_rng(ckpt / "rng", engine.process_index)
    return json.loads((ckpt / "train_state.json").read_text())


def _stored_names(flat: dict[str, torch.Tensor], reader) -> dict[str, torch.Tensor]:
    """``flat`` under the names the checkpoint stores: today's, or an older version's parameter names
    (``model.tok_emb.weight``, ``optim.lm_head.weight.exp_avg``; the map is ``model.transfusion.current_name``)."""
    from ..model.transfusion import current_name

    stored = reader.read_metadata().state_dict_metadata
    old = {}
    for key in stored:
        section, _, name = key.partition(".")
        if (new := f"{section}.{current_name(name)}") != key:
            old[new] = key
    return {old.get(k, k): v for k, v in flat.items()}


@contextlib.contextmanager
def _one_process_quiet():
    """DCP warns on every call without a process group that it assumes one process: that is the point."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _broadcast(engine, value):
    if engine.num_processes == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)  # the main process's own list of file names
    return box[0]


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside first and removed after, so a
    kill at any moment leaves one complete folder under one of the two names."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# The exported model
# --------------------------------------------------------------------------------------------------
def export_model(model: torch.nn.Module, config, out_dir: str | Path, parts=None) -> Path:
    """Weights as safetensors + the resolved config as json: what ``from_pretrained`` reads. ``parts(folder)``
    adds the rest (tokenizer, codec, model card: ``hub.add_parts``) before the folder is renamed into place."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp / "model.safetensors")
    (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=list))
    if parts is not None:
        parts(tmp)
    _replace_dir(tmp, out)
    return out


def load_exported(model_dir: str | Path):
    """(config, state_dict) of an exported model folder, with errors that name the missing file. Folders of
    older versions load too: their config through ``config_from_dict``, their parameter names mapped to
    today's (``model.transfusion.current_name``)."""
    from ..config import config_from_dict
    from ..model.transfusion import current_name

    model_dir = Path(model_dir)
    for name in ("config.json", "model.safetensors"):
        if not (model_dir / name).exists():
            raise FileNotFoundError(f"{model_dir / name} is missing: not an exported transfusion_mot model "
                                    f"(a run directory holds one in model/)")
    cfg = config_from_dict(json.loads((model_dir / "config.json").read_text()))
    return cfg, {current_name(k): v for k, v in load_file(model_dir / "model.safetensors").items()}

