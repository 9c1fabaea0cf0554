"""Exponential moving average of the weights, checkpointed with everything else."""
from __future__ import annotations

import copy

import torch


class EMA(torch.nn.Module):
    """Holds a frozen copy of the model; ``update`` blends the live weights in after every step."""

    def __init__(self, model: torch.nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        ema_params = list(self.model.parameters())
        live = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_params)]
        torch._foreach_lerp_(ema_params, live, 1.0 - self.decay)

    def state_dict(self, *args, **kwargs):  # accelerate's register_for_checkpointing protocol
        return self.model.state_dict()

    def load_state_dict(self, state, strict: bool = True):
        return self.model.load_state_dict(state, strict=strict)
