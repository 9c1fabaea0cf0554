"""The one MoT primitive: a module per modality group, applied to the tokens of that group.

Routing is computed once per batch from the modality ids (``Routing.from_modality``) and handed to
every layer, so no layer looks at boolean masks. The backbone keeps its residual stream in
group-sorted token order (``routing.sort``), so every per-modality module runs on a contiguous slice
with no gather at all; only attention, which needs the (B, T) layout, unsorts its input and sorts its
output (two gathers per layer). With a single group (dense, MoE) the order is the identity and nothing
is gathered: dense pays nothing for MoT.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn


@dataclass
class Routing:
    """Which group each of the N = B*T flattened tokens belongs to, as a sort order."""

    order: torch.Tensor | None  # (N,) flat token indices sorted by group (stable); None = identity
    inverse: torch.Tensor | None  # (N,) position of each token inside `order`
    counts: list[int]  # tokens per group, sums to N
    shape: tuple[int, int]  # (B, T) of the sequence layout

    @classmethod
    def from_modality(cls, modality: torch.Tensor, n_groups: int) -> "Routing":
        """modality (B, T) ids in [0, n_groups) -> routing. Ids are checked here, once per batch."""
        group = modality.reshape(-1)
        if n_groups == 1:
            return cls(order=None, inverse=None, counts=[group.numel()], shape=tuple(modality.shape))
        if group.numel() and (int(group.min()) < 0 or int(group.max()) >= n_groups):
            raise ValueError(f"modality ids must lie in [0, {n_groups}), got {group.unique().tolist()}")
        order = torch.sort(group, stable=True).indices
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        counts = torch.bincount(group, minlength=n_groups).tolist()
        return cls(order=order, inverse=inverse, counts=counts, shape=tuple(modality.shape))

    @property
    def n_groups(self) -> int:
        return len(self.counts)

    def sort(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) in sequence order -> (N, ...) in group order."""
        return x if self.order is None else _Permute.apply(x, self.order, self.inverse)

    def unsort(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) in group order -> (N, ...) in sequence order."""
        return x if self.inverse is None else _Permute.apply(x, self.inverse, self.order)


class _Permute(torch.autograd.Function):
    """``x[perm]`` whose backward is the inverse permutation's gather. Autograd's own backward of
    indexing is a scatter-add into zeros (it cannot know the index is a permutation), which on CPU
    costs several times the forward gather; this is the one place MoT pays for its routing."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class PerModality(nn.Module):
    """``groups[m]`` processes the tokens of group m. Input and output are (N, D) in group order."""

    def __init__(self, make: Callable[[], nn.Module], n_groups: int):
        super().__init__()
        self.groups = nn.ModuleList(make() for _ in range(n_groups))

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x (N, D) sorted by group -> (N, D_out): each group's module on its contiguous slice."""
        if len(self.groups) == 1:
            return self.groups[0](x)
        return torch.cat([g(xm) for g, xm in zip(self.groups, x.split(routing.counts))])


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
