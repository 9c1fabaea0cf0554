"""The one MoT primitive: a module per modality group, applied to the tokens of that group.

Routing is computed once per batch from the modality ids (``Routing.from_modality``) and handed to
every layer, so no layer looks at boolean masks. Between layers the backbone keeps its residual stream
as one tensor per group (``routing.split``), so every per-modality module runs on its own tokens with
no gather and no concatenation; only attention, which needs the (B, T) layout, merges the groups'
projections into sequence order (``routing.merge``) and splits its output again: one indexed copy of
the tokens each way per layer. With a single group (dense, MoE), or a batch of one modality (an
image-only sampling step), split and merge are views and nothing is copied: dense pays nothing for MoT.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn


@dataclass
class Routing:
    """Which group each of the N = B*T flattened tokens belongs to."""

    # Per group, the flat positions of its tokens (ascending), and for each token its place in the groups'
    # concatenation; both None when one group holds every token (then split/merge are views).
    index: list[torch.Tensor] | None
    inverse: torch.Tensor | None  # (N,)
    counts: list[int]  # tokens per group, sums to N
    shape: tuple[int, int]  # (B, T) of the sequence layout
    whole: int = 0  # with index None: the group holding every token (dense; an image-only sampling step)

    @classmethod
    def from_modality(cls, modality: torch.Tensor, n_groups: int) -> "Routing":
        """modality (B, T) ids in [0, n_groups) -> routing. Ids are checked here, once per batch."""
        group, shape = modality.reshape(-1), tuple(modality.shape)
        if n_groups == 1:
            return cls(index=None, inverse=None, counts=[group.numel()], shape=shape)
        if group.numel() and (int(group.min()) < 0 or int(group.max()) >= n_groups):
            raise ValueError(f"modality ids must lie in [0, {n_groups}), got {group.unique().tolist()}")
        counts = torch.bincount(group, minlength=n_groups).tolist()
        if max(counts) == group.numel():  # one modality only: views, no gathers
            return cls(index=None, inverse=None, counts=counts, shape=shape, whole=counts.index(group.numel()))
        order = torch.sort(group, stable=True).indices
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return cls(index=list(order.split(counts)), inverse=inverse, counts=counts, shape=shape)

    def mark_dynamic(self, xs: list[torch.Tensor]) -> None:
        """Tell torch.compile that the group sizes (dim 0 of each group's tensor and index) change from
        batch to batch while everything else (B, T, D, heads) stays fixed: a compiled block then keeps
        one graph for every routing with static shapes elsewhere (``dynamic=True`` would make every
        dimension symbolic; measured slower on CPU). A no-op in eager mode beyond setting a flag."""
        if self.index is None:
            return
        for t in (*xs, *self.index):
            torch._dynamo.maybe_mark_dynamic(t, 0)

    @property
    def n_groups(self) -> int:
        return len(self.counts)

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(N, ...) in sequence order -> one (N_g, ...) tensor per group."""
        if self.index is None:
            return [x if g == self.whole else x[:0] for g in range(len(self.counts))]
        if not torch.is_grad_enabled():  # the same gathers; torch.compile cannot trace a Function's ctx here
            return [x.index_select(0, idx) for idx in self.index]
        return list(_Split.apply(x, self.inverse, *self.index))

    def merge(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """One (N_g, ...) tensor per group -> (N, ...) in sequence order (inverse of ``split``)."""
        if self.index is None:
            return parts[self.whole]
        if not torch.is_grad_enabled():
            return torch.cat(parts).index_select(0, self.inverse)
        return _Merge.apply(len(parts), self.inverse, *self.index, *parts)


class _Split(torch.autograd.Function):
    """Gather each group's tokens. Backward joins the groups' gradients and puts them back in sequence
    order with one gather (autograd's backward of indexing would scatter-add each group into zeros)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, inverse: torch.Tensor, *index: torch.Tensor):
        ctx.save_for_backward(inverse)
        return tuple(x.index_select(0, idx) for idx in index)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return (torch.cat(grads).index_select(0, inverse), None, *([None] * len(grads)))


class _Merge(torch.autograd.Function):
    """Join the groups' tokens in sequence order: concatenate, then one gather by the inverse order (on CPU
    twice as fast as writing each group in place with index_copy_). Backward is the split's gather."""

    @staticmethod
    def forward(ctx, n_groups: int, inverse: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        index, parts = args[:n_groups], args[n_groups:]
        ctx.save_for_backward(*index)
        return torch.cat(parts).index_select(0, inverse)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        index = ctx.saved_tensors
        return (None, None, *([None] * len(index)), *(grad.index_select(0, idx) for idx in index))


class PerModality(nn.Module):
    """``groups[m]`` processes the tokens of group m: a list of per-group tensors in, one out."""

    def __init__(self, make: Callable[[], nn.Module], n_groups: int):
        super().__init__()
        self.groups = nn.ModuleList(make() for _ in range(n_groups))

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [g(x) for g, x in zip(self.groups, xs)]


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
