"""Exponential moving average of the weights, held the way the model holds them."""
from __future__ import annotations

import math

import torch

from .parallel import local


class EMA:
    """Shadow weights, one tensor per parameter: the local shard of each FSDP2 DTensor (created after
    sharding, updated shard-wise, gathered only to evaluate or export) or the whole tensor under DDP.
    ``update`` blends the live weights in after every optimizer step.

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after n updates (timm, diffusers), so a
    short run's average is not dominated by the random initial weights (0.995^200 would still be 37%).
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.params = dict(model.named_parameters())  # the live (possibly sharded) parameters
        self.shadow = {n: local(p).detach().clone() for n, p in self.params.items()}
        self.updates = 0

    def current_decay(self) -> float:
        return self.decay_after(self.updates)

    def decay_after(self, n: int) -> float:
        """The decay the (n + 1)-th update blends with."""
        return min(self.decay, (1 + n) / (10 + n))

    def warmup_note(self, steps: int) -> str | None:
        """One line when a run of ``steps`` updates ends before the warm-up reaches the configured decay
        (then ``train.ema_decay`` does not change the result), else None."""
        reach = math.ceil((10 * self.decay - 1) / (1 - self.decay) - 1e-9)  # first n with (1 + n) / (10 + n) >= decay
        if steps >= reach + 1:
            return None
        return (f"ema: the decay warms up as (1 + n) / (10 + n) and reaches train.ema_decay={self.decay} after "
                f"{reach} updates; this run's {steps} end at {self.decay_after(steps - 1):.4f}, so a larger "
                f"ema_decay would give the same weights")

    @torch.no_grad()
    def update(self) -> None:
        names = list(self.shadow)
        live = [local(self.params[n]).detach().to(self.shadow[n].dtype) for n in names]
        torch._foreach_lerp_([self.shadow[n] for n in names], live, 1.0 - self.current_decay())
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Shadow weights under the parameters' names, as DTensors laid out like the live ones when
        sharded (what distributed checkpointing saves and loads shard by shard)."""
        from torch.distributed.tensor import DTensor

        out = {}
        for n, p in self.params.items():
            s = self.shadow[n]
            out[n] = DTensor.from_local(s, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()) \
                if isinstance(p, DTensor) else s
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for n, t in state.items():
            self.shadow[n].copy_(local(t))
