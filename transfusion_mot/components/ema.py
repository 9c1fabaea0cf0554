"""Exponential moving average of the weights, checkpointed with everything else."""
from __future__ import annotations

import copy

import torch


class EMA(torch.nn.Module):
    """Holds a frozen copy of the model; ``update`` blends the live weights in after every step.

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after n updates (timm, diffusers), so a
    short run's average is not dominated by the random initial weights (0.995^200 would still be 37%).
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        n = int(self.updates)
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        ema_params = list(self.model.parameters())
        live = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_params)]
        torch._foreach_lerp_(ema_params, live, 1.0 - self.current_decay())
        self.updates += 1

    def state_dict(self, *args, **kwargs):  # accelerate's register_for_checkpointing protocol
        return {**self.model.state_dict(), "_ema_updates": self.updates.clone()}

    def load_state_dict(self, state, strict: bool = True):
        state = dict(state)
        self.updates.copy_(state.pop("_ema_updates", torch.zeros((), dtype=torch.long)))
        return self.model.load_state_dict(state, strict=strict)
