"""The one MoT primitive: a module per modality group, applied to the tokens of that group.

Routing is computed once per batch from the modality ids (``Routing.from_modality``) and handed to
every layer, so no layer looks at boolean masks. Tokens are gathered into group-sorted order with one
index, each group's module runs on its contiguous slice, and one more gather restores the order.
With a single group (dense, MoE) the module is applied directly: dense pays nothing for MoT.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn


@dataclass
class Routing:
    """Which group each of the N = B*T flattened tokens belongs to, as a sort order."""

    order: torch.Tensor  # (N,) flat token indices sorted by group (stable)
    inverse: torch.Tensor  # (N,) position of each token inside `order`
    counts: list[int]  # tokens per group, sums to N
    group: torch.Tensor  # (N,) group id per token

    @classmethod
    def from_modality(cls, modality: torch.Tensor, n_groups: int) -> "Routing":
        """modality (B, T) ids in [0, n_groups) -> routing. Ids are checked here, once per batch."""
        group = modality.reshape(-1)
        if n_groups == 1:
            group = torch.zeros_like(group)
        elif group.numel() and (int(group.min()) < 0 or int(group.max()) >= n_groups):
            raise ValueError(f"modality ids must lie in [0, {n_groups}), got {group.unique().tolist()}")
        order = torch.sort(group, stable=True).indices
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        counts = torch.bincount(group, minlength=n_groups).tolist()
        return cls(order=order, inverse=inverse, counts=counts, group=group)

    @property
    def n_groups(self) -> int:
        return len(self.counts)


class PerModality(nn.Module):
    """``groups[m]`` processes the tokens of group m; the output keeps the input's token order."""

    def __init__(self, make: Callable[[], nn.Module], n_groups: int):
        super().__init__()
        self.groups = nn.ModuleList(make() for _ in range(n_groups))

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D_out)."""
        if len(self.groups) == 1:
            return self.groups[0](x)
        b, t, d = x.shape
        xs = x.reshape(b * t, d)[routing.order].split(routing.counts)  # per group (N_m, D)
        ys = torch.cat([g(xm) for g, xm in zip(self.groups, xs)])  # (N, D_out), sorted by group
        return ys[routing.inverse].reshape(b, t, -1)


def untie_from_dense(mot: nn.Module, dense: nn.Module) -> None:
    """Dense -> MoT upcycling: copy each dense group-0 weight into every group of the MoT model.

    Parameters that are not per-modality (embeddings, heads) are copied as they are.
    """
    dense_state = dense.state_dict()
    new_state = {}
    for name, tensor in mot.state_dict().items():
        parts = name.split(".")
        if "groups" in parts:
            i = parts.index("groups")
            parts[i + 1] = "0"
        src = ".".join(parts)
        if src not in dense_state:
            raise KeyError(f"upcycling: dense model has no parameter {src!r} for {name!r}")
        if dense_state[src].shape != tensor.shape:
            raise ValueError(f"upcycling: shape of {src!r} {tuple(dense_state[src].shape)} != {tuple(tensor.shape)}")
        new_state[name] = dense_state[src]
    mot.load_state_dict(new_state)
