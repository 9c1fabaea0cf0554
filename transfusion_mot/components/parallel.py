"""Parallelism and precision, applied from outside the single-device model (torchtitan's parallelize.py).

accelerate launches the processes, places them on devices, reduces scalars and runs the trackers. The
model is parallelised here, one code path on CPU (gloo) and GPU (NCCL) alike:

- ``ddp``: accelerate's ``prepare`` wraps the model in DistributedDataParallel (one process: no wrapper).
- ``fsdp``: FSDP2, ``torch.distributed.fsdp.fully_shard`` on every transformer ``Block`` and then on the
  root (embeddings, heads, final norms); parameters become DTensors holding this rank's shard.
  accelerate never sees the model: its FSDP plugin is ignored on CPU (it wraps in DDP there), so the
  project shards the model itself and masks the plugin's settings while the Accelerator is built.

Precision has one source of truth, ``resolve_precision``: ``train.mixed_precision=auto`` follows the
launcher (``accelerate launch --mixed_precision X`` or its config file), else bf16 on CUDA and fp32 on
CPU; an explicit value that contradicts the launcher's is refused, never silently overridden. bf16 and
fp16 run under ``torch.autocast`` (FSDP2 also all-gathers the weights in that dtype and reduces
gradients in fp32); fp16 adds a dynamic loss scale (``LossScaler``).
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch
from accelerate import Accelerator

from ..config import Config, ConfigError

PRECISIONS = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_FSDP_ENV = ("ACCELERATE_USE_FSDP", "FSDP_VERSION")


def _truthy(value: str | None) -> bool:
    return str(value).lower() in ("1", "true", "yes")


def resolve_parallel(cfg: Config, env=os.environ) -> str:
    """'ddp' or 'fsdp': ``train.parallel``, where 'auto' follows an accelerate FSDP launch config."""
    mode = cfg.train.parallel
    launched_fsdp = _truthy(env.get("ACCELERATE_USE_FSDP"))
    if launched_fsdp and env.get("FSDP_VERSION", "2") != "2":
        raise ConfigError(f"the accelerate config asks for FSDP version {env.get('FSDP_VERSION')}; this project "
                          "shards with FSDP2 (fully_shard): set fsdp_version: 2")
    if mode == "auto":
        return "fsdp" if launched_fsdp else "ddp"
    if mode == "ddp" and launched_fsdp:
        raise ConfigError("train.parallel=ddp but accelerate was launched with an FSDP config; "
                          "use train.parallel=auto (or fsdp), or launch without FSDP")
    return mode


def resolve_precision(cfg: Config, cuda: bool, env=os.environ) -> str:
    """'no' | 'bf16' | 'fp16': the config, or the launcher's flag when the config says 'auto'."""
    mine = cfg.train.mixed_precision
    launcher = env.get("ACCELERATE_MIXED_PRECISION")  # set by `accelerate launch` from its flag or config
    if launcher is not None and launcher not in PRECISIONS:
        raise ConfigError(f"accelerate launch --mixed_precision {launcher}: this project trains in no, bf16 or fp16")
    if mine == "auto":
        return launcher or ("bf16" if cuda else "no")
    if launcher is not None and launcher != mine:
        raise ConfigError(f"train.mixed_precision={mine} but accelerate launch says --mixed_precision {launcher}: "
                          f"set one of them (train.mixed_precision=auto follows the launcher)")
    return mine


class LossScaler:
    """Dynamic loss scale for fp16 (torch.amp.GradScaler's rule: x0.5 on overflow, x2 after
    ``interval`` finite steps). The overflow test is the step's global gradient norm, which every rank
    computes alike, so all ranks skip together; GradScaler's per-rank inf check cannot see other shards."""

    def __init__(self, scale: float = 2.0 ** 16, interval: int = 2000):
        self.scale, self.interval, self.good = scale, interval, 0

    def unscale_(self, params) -> None:
        grads = [local(p.grad) for p in params if p.grad is not None]
        torch._foreach_mul_(grads, 1.0 / self.scale)

    def update(self, finite: bool) -> None:
        if not finite:
            self.scale, self.good = self.scale * 0.5, 0
        else:
            self.good += 1
            if self.good == self.interval:
                self.scale, self.good = self.scale * 2.0, 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good": self.good}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good = float(state["scale"]), int(state["good"])


class Engine(Accelerator):
    """accelerate's Accelerator with this project's sharding and precision: ``prepare_model``,
    ``no_sync``, ``autocast``, ``backward`` and ``clip_grad_norm_`` do what the run's mode needs, so
    the training step reads the same under DDP and FSDP2."""

    def __init__(self, cfg: Config, project_dir: str, trackers: list[str] | None = None):
        saved = {k: os.environ.pop(k) for k in _FSDP_ENV if k in os.environ}
        # A plain multi-process Accelerator on CPU and GPU alike; precision is ours, not accelerate's.
        # step_scheduler_with_optimizer=False: accelerate would otherwise step the schedule once per process
        # per optimizer step (it assumes each process sees 1/N of the batches), so N processes would run an
        # N-times faster warmup/cosine than one process on the same global batch (caught by the 2-process test).
        try:
            super().__init__(mixed_precision="no", log_with=trackers or None, project_dir=project_dir,
                             step_scheduler_with_optimizer=False)
        finally:
            os.environ.update(saved)
        self.mode = resolve_parallel(cfg, {**os.environ})
        self.precision = resolve_precision(cfg, self.device.type == "cuda")
        self.dtype = PRECISIONS[self.precision]
        self.scaler = LossScaler() if self.precision == "fp16" else None
        self.reshard = _truthy(os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true"))
        self._own_group = False
        self.text_log = None  # the run's train.log: what ``print`` shows, also written there (main process)

    def print(self, *args, **kwargs) -> None:
        super().print(*args, **kwargs)
        if self.text_log is not None and self.is_main_process:
            with open(self.text_log, "a") as f:
                print(*args, file=f)

    # -- the model --
    def prepare_model(self, model: torch.nn.Module, *args, **kwargs) -> torch.nn.Module:
        if self.mode == "ddp":
            return super().prepare_model(model, *args, **kwargs)
        return self._shard(model.to(self.device))

    def _shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """fully_shard per Block, then the root: each block's weights are all-gathered for its forward and
        again for its backward (the last block's are kept), its gradients reduce-scattered."""
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if not dist.is_initialized():  # one process without a launcher: a group of one
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            self._own_group = True
        mesh = init_device_mesh(self.device.type, (dist.get_world_size(),))
        # The model returns views (reshapes of its outputs) and nothing modifies them in place: FSDP2's
        # warning about in-place ops on such views does not apply.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        policy = MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32)
        blocks = model.backbone.blocks
        for i, block in enumerate(blocks):  # the last block's weights are needed again at once by backward
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=self.reshard and i < len(blocks) - 1)
        fully_shard(model, mesh=mesh, mp_policy=policy)  # FSDP2 keeps the root unsharded between forward and backward
        return model

    def unwrap_model(self, model, *args, **kwargs):
        return model if self.mode == "fsdp" else super().unwrap_model(model, *args, **kwargs)

    def release(self) -> None:
        """End the process group this engine started for a one-process FSDP run."""
        import torch.distributed as dist

        if self._own_group and dist.is_initialized():  # end_training may have ended it already
            dist.destroy_process_group()
        self._own_group = False

    # -- one training step --
    def no_sync(self, model):
        if self.mode == "ddp":
            return super().no_sync(model)
        return _fsdp_no_sync(model)

    def autocast(self, *args, **kwargs):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        (loss * self.scaler.scale if self.scaler is not None else loss).backward(**kwargs)

    def clip_grad_norm_(self, parameters, max_norm: float, norm_type: float = 2) -> torch.Tensor:
        """Unscale (fp16), then the global gradient norm (over all shards; clipped when ``max_norm``)."""
        params = [p for p in parameters if p.grad is not None]
        if self.scaler is not None:
            self.scaler.unscale_(params)
        if self.mode == "fsdp":
            return _sharded_clip(params, max_norm).cpu()
        return torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"), norm_type).float().cpu()


def _sharded_clip(params: list, max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ (L2, same formula) on the local shards with one all-reduce: every element of
    an FSDP2 parameter lives on exactly one rank, so the squared norms add up. On DTensors, torch's version
    dispatches every op through DTensor (measured: 9 ms against 1 ms per step at the debug size on CPU)."""
    import torch.distributed as dist

    grads = [local(p.grad) for p in params]
    squares = torch.stack([n.float() for n in torch._foreach_norm(grads)]).pow(2).sum()
    dist.all_reduce(squares)
    total = squares.sqrt()
    if max_norm:
        torch._foreach_mul_(grads, (max_norm / (total + 1e-6)).clamp(max=1.0))
    return total


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: the local shard of a DTensor, the tensor itself otherwise."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for DTensors: every rank must call it)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(next(model.parameters()), DTensor)


def full_state_dict(state: dict[str, torch.Tensor], main: bool) -> dict[str, torch.Tensor]:
    """Gathered CPU copies of a (possibly sharded) state dict; every rank calls, the main one keeps them."""
    out = {}
    for name, t in state.items():
        whole = full(t.detach())
        if main:
            out[name] = whole.cpu().clone()
    return out


class EvalCopy:
    """The weights to evaluate, sample and export, as a plain single-device module on the main process.

    Under FSDP2 the weights are gathered into a copy (built once), so evaluation never runs a sharded
    model on one rank while the others wait; under DDP the live module is used as before. Every rank
    calls it (gathering is collective); other ranks get None."""

    def __init__(self, build, engine: Engine):
        self.build, self.engine, self.module = build, engine, None

    def __call__(self, model: torch.nn.Module, ema=None) -> torch.nn.Module | None:
        main = self.engine.is_main_process
        if ema is None and not is_sharded(model):
            return self.engine.unwrap_model(model) if main else None
        live = self.engine.unwrap_model(model).state_dict()
        state = full_state_dict({**live, **(ema.state_dict() if ema is not None else {})}, main)
        if not main:
            return None
        if self.module is None:
            with torch.random.fork_rng(devices=[]):  # building initialises weights: leave the run's RNG alone
                self.module = self.build().to(self.engine.device)
        self.module.load_state_dict(state)
        return self.module.eval()
