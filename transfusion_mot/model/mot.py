"""Mixture-of-Transformers backbone (MoT paper, Algorithm 1): per-modality QKV / output projection /
feed-forward / norms, global self-attention. Dense is the same code with one group; MoE-4x swaps the
feed-forward for expert-choice experts (routed within each document in training, by a causal per-token
router in eval mode and cached decoding: ``MoEFeedForward`` says what stays non-causal). Pure
single-device PyTorch.

Norm placement ``post`` (the paper's Algorithm 1):  H = X + Norm_attn(O(attn(QKV(X))));  Y = H + Norm_ffn(FFN(H))
Norm placement ``pre`` (Llama style):               H = X + O(attn(QKV(Norm_attn(X)))); Y = H + FFN(Norm_ffn(H))
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import BackboneConfig
from .layers import RMSNorm, Rotary, SwiGLU, apply_rotary
from .masks import additive_mask, dense_mask, flex_backward_runs, is_block_mask
from .modality import PerModality, Routing


class KVCache:
    """Keys/values per layer for incremental decoding and for a prompt reused across flow steps.

    ``frozen`` caches are read but never extended: every flow step attends to the same prompt.
    """

    def __init__(self, n_layers: int, frozen: bool = False):
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.frozen = frozen

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        if not self.frozen:
            self.k[layer], self.v[layer] = k, v
        return k, v

    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def expand(self, repeats: int) -> "KVCache":
        """A frozen view with each batch row repeated (e.g. one prompt, several images)."""
        out = KVCache(len(self.k), frozen=True)
        out.k = [k.repeat_interleave(repeats, 0) for k in self.k]
        out.v = [v.repeat_interleave(repeats, 0) for v in self.v]
        return out


class QKV(nn.Module):
    """One group's query/key/value projection (+ the pre-norm, + optional QK-norm)."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.dim) if cfg.norm_placement == "pre" else None
        self.proj = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim) if cfg.qk_norm else None
        self.head_dim = cfg.head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.proj(x if self.norm is None else self.norm(x))  # (N, 3D)
        if self.q_norm is None:
            return qkv
        q, k, v = qkv.chunk(3, dim=-1)
        q = self.q_norm(q.unflatten(-1, (-1, self.head_dim))).flatten(-2)
        k = self.k_norm(k.unflatten(-1, (-1, self.head_dim))).flatten(-2)
        return torch.cat([q, k, v], dim=-1)


class Sublayer(nn.Module):
    """A projection or FFN wrapped with its norm: Norm(f(x)) for post-norm, f(Norm(x)) for pre-norm."""

    def __init__(self, f: nn.Module, cfg: BackboneConfig, norm_input: bool):
        super().__init__()
        self.f = f
        post = cfg.norm_placement == "post"
        self.norm_in = RMSNorm(cfg.dim) if (norm_input and not post) else None  # None, not Identity: a
        self.norm_out = RMSNorm(cfg.dim) if post else None  # module call per group and layer is not free

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        y = self.f(x if self.norm_in is None else self.norm_in(x), *args)
        return y if self.norm_out is None else self.norm_out(y)


class MoEFeedForward(nn.Module):
    """E SwiGLU experts of the dense FFN's shape: the MoT paper's MoE-4x baseline.

    Expert choice (training): within each document of n real tokens, expert e takes the k_e tokens it
    gives the highest router probability, the k_e summing to round(capacity * n), so a real token meets
    ``capacity`` expert FFNs on average (dense FLOPs at 1.0); padding is never counted or chosen. Nothing
    crosses a document, so other documents, rows, batch sizes and the number of processes change no
    result. What remains non-causal: within a document, whether an expert takes a token depends on the
    document's later tokens, so a training step's text loss can read a little of the future through the
    routing (expert choice's known leak; the paper's baseline trains this way).

    Causal router (eval mode: generation, captioning, validation, every cached path): a linear predictor
    per expert, trained beside the router on its detached input to predict by binary cross-entropy
    whether expert choice takes the token (Mixture-of-Depths' auxiliary predictor), runs expert e on a
    token iff its logit is > 0, gated by the router's probability as in training. Every token is routed
    by itself, so a cached decode computes what the full forward computes. Its loss is ``aux_loss`` in
    training (weighted by model.moe_aux_weight; the detached input means it trains the predictor alone).

    Token choice: the top-1 expert of each real token (causal everywhere), with the Switch
    load-balancing loss in ``aux_loss``.
    """

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.router = nn.Linear(cfg.dim, cfg.moe_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(cfg.dim, cfg.hidden) for _ in range(cfg.moe_experts))
        self.routing, self.capacity = cfg.moe_routing, cfg.moe_capacity
        expert_choice = cfg.moe_routing == "expert_choice"
        self.predictor = nn.Linear(cfg.dim, cfg.moe_experts, bias=False) if expert_choice else None
        self.aux_loss = torch.zeros(())

    def forward(self, x: torch.Tensor, segments: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        """x (..., D); ``segments`` (N,) document of each of the N tokens, -1 on padding (None: one
        document); ``causal``: route every token by itself (eval mode, cached decoding)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D)
        n_exp = len(self.experts)
        segments = torch.zeros(x.shape[0], dtype=torch.long, device=x.device) if segments is None else segments
        valid = segments >= 0  # (N,)
        probs = self.router(x).float().softmax(dim=-1)  # (N, E)
        aux = x.new_zeros((), dtype=torch.float32)
        if self.routing == "token_choice":
            choice = probs.argmax(dim=-1)  # (N,)
            chosen = F.one_hot(choice, n_exp).bool() & valid[:, None]
            n_valid = valid.sum().clamp(min=1)
            frac = chosen.sum(0).float() / n_valid  # share of real tokens per expert
            aux = n_exp * (frac * (probs * valid[:, None]).sum(0) / n_valid).sum()
        elif causal:
            chosen = (self.predictor(x) > 0) & valid[:, None]  # (N, E)
        else:
            chosen = expert_choice(probs.detach(), segments, self.capacity)  # (N, E)
            if self.training and bool(valid.any()):
                logits = self.predictor(x.detach()).float()
                aux = F.binary_cross_entropy_with_logits(logits[valid], chosen[valid].float())
        gate = probs.to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            idx = chosen[:, e].nonzero().squeeze(1)
            out = out.index_add(0, idx, expert(x[idx]) * gate[idx, e, None])
        self.aux_loss = aux
        return out.reshape(shape)


def expert_choice(probs: torch.Tensor, segments: torch.Tensor, capacity: float) -> torch.Tensor:
    """(N, E) bool: within each segment of n tokens, expert e takes its k_e most probable tokens, with
    sum_e k_e = round(capacity * n) and the k_e within one of each other. Segment -1 (padding) gets none."""
    n, n_exp = probs.shape
    pad = int(segments.max().clamp(min=-1)) + 1  # padding becomes the last segment, sorted after the others
    seg = torch.where(segments >= 0, segments, pad)  # (N,)
    counts = torch.bincount(seg, minlength=pad + 1)  # (S,) tokens per segment
    slots = torch.round(capacity * counts.double()).long()
    slots[pad] = 0
    experts = torch.arange(n_exp, device=probs.device)
    k = (slots[:, None] + n_exp - 1 - experts) // n_exp  # (S, E) tokens expert e takes from each segment
    key = seg.double()[:, None] * 2 + (1 - probs.double())  # (N, E) by segment, then by falling probability
    order = key.argsort(dim=0, stable=True)  # (N, E)
    sorted_seg = seg[order]  # (N, E)
    rank = torch.arange(n, device=probs.device)[:, None] - (counts.cumsum(0) - counts)[sorted_seg]
    taken = rank < k[sorted_seg, experts]  # (N, E) in sorted order
    return torch.zeros_like(taken).scatter(0, order, taken)


class Block(nn.Module):
    def __init__(self, cfg: BackboneConfig, layer: int, n_groups: int = 1, moe: bool = False):
        super().__init__()
        self.layer, self.n_heads, self.dim = layer, cfg.n_heads, cfg.dim
        g = n_groups
        self.qkv = PerModality(lambda: QKV(cfg), g)
        self.out = PerModality(lambda: Sublayer(nn.Linear(cfg.dim, cfg.dim, bias=False), cfg, norm_input=False), g)
        if moe:
            if g != 1:
                raise ValueError("MoE feed-forward is a dense-attention baseline: use n_groups=1")
            self.ffn = Sublayer(MoEFeedForward(cfg), cfg, norm_input=True)
        else:
            self.ffn = PerModality(lambda: Sublayer(SwiGLU(cfg.dim, cfg.hidden), cfg, norm_input=True), g)

    def forward(self, xs: list[torch.Tensor], routing: Routing, rope, mask, cache: KVCache | None = None,
                segments: torch.Tensor | None = None) -> list[torch.Tensor]:
        """xs: the residual stream, one (N_g, D) tensor per group -> the same. Attention runs in the (B, T) layout."""
        b, t = routing.shape
        d = self.dim
        qkv = routing.merge(self.qkv(xs))  # (N, 3D) in sequence order
        q, k, v = qkv.view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)  # (B, H, T, hd)
        if cache is not None:
            k, v = cache.extend(self.layer, k, v)
        a = attend(q, k, v, mask).transpose(1, 2).reshape(b * t, d)
        hs = [x + o for x, o in zip(xs, self.out(routing.split(a)))]
        if isinstance(self.ffn, PerModality):
            return [h + f for h, f in zip(hs, self.ffn(hs))]
        causal = cache is not None or not self.training  # MoE: the per-token router (MoEFeedForward)
        return [hs[0] + self.ffn(hs[0], segments, causal)]  # MoE: one group


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """SDPA with a boolean or additive mask, or flex attention when given a BlockMask. On CUDA outside a
    compiled block, flex runs compiled on its own (eager flex materialises the whole score matrix)."""
    if isinstance(mask, torch.Tensor) or mask is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    from torch.nn.attention.flex_attention import flex_attention

    if q.is_cuda and not torch.compiler.is_compiling():
        return _compiled_flex()(q, k, v, block_mask=mask)
    return flex_attention(q, k, v, block_mask=mask)


@functools.cache
def _compiled_flex():
    """flex_attention compiled once per process (torchtitan does the same): its fused kernel on CUDA."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


class Backbone(nn.Module):
    """Blocks + a per-modality final norm. Input and output (B, T, D).

    ``n_groups`` weight groups (1: dense) and ``moe`` (the MoE-4x feed-forward, one group) are given by the
    model (``ModelConfig.n_groups`` / ``.moe``, which follow from model.arch and the modalities), not by
    ``cfg``, the shape a user sets."""

    def __init__(self, cfg: BackboneConfig, n_groups: int = 1, moe: bool = False):
        super().__init__()
        self.cfg, self.n_groups, self.moe = cfg, n_groups, moe
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)
        self.blocks = nn.ModuleList(Block(cfg, i, n_groups, moe) for i in range(cfg.n_layers))
        self.norm = PerModality(lambda: RMSNorm(cfg.dim), n_groups)
        self.checkpointing = False  # activation checkpointing per block (set by the trainer)

    def forward(self, x, modality, position, mask, cache: KVCache | None = None,
                doc_id: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D). Between the layers the residual stream is one tensor per group.
        ``doc_id`` (B, T), -1 on padding (None: each row one document), is read by MoE routing only."""
        b, t, d = x.shape
        routing = Routing.from_modality(modality, self.n_groups)  # once per batch, for every layer
        rope = self.rotary(position)
        if is_block_mask(mask) and torch.is_grad_enabled() and not flex_backward_runs(x.device.type):
            if x.requires_grad or any(p.requires_grad for p in self.parameters()):
                mask = dense_mask(mask)  # no flex backward on this device (CPU): SDPA over the same rule
        if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:  # SDPA would convert it in every layer
            mask = additive_mask(mask, x.dtype)
        xs = routing.split(x.reshape(b * t, d))
        segments = document_segments(doc_id, (b, t), x.device) if self.moe else None
        for block in self.blocks:
            routing.mark_dynamic(xs)
            if self.checkpointing and self.training and cache is None:
                xs = torch.utils.checkpoint.checkpoint(block, xs, routing, rope, mask, None, segments,
                                                       use_reentrant=False)
            else:
                xs = block(xs, routing, rope, mask, cache, segments)
        return routing.merge(self.norm(xs)).reshape(b, t, d)

    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE auxiliary losses of the last forward: token choice's load balancing, expert
        choice's router predictor (0 for dense / MoT, and in eval mode)."""
        losses = [b.ffn.f.aux_loss for b in self.blocks if isinstance(b.ffn, Sublayer)]
        return torch.stack(losses).sum() if losses else torch.zeros(())


def document_segments(doc_id: torch.Tensor | None, shape: tuple[int, int], device) -> torch.Tensor:
    """(N,) one id per (row, document) of the flattened (B, T) tokens, -1 on padding: what MoE expert
    choice routes within. Rows count apart, so rows that reuse document ids (sampling) stay apart."""
    b, t = shape
    if doc_id is None:
        return torch.arange(b, device=device).repeat_interleave(t)
    width = int(doc_id.max().clamp(min=0)) + 1
    rows = torch.arange(b, device=doc_id.device)[:, None]
    return torch.where(doc_id >= 0, rows * width + doc_id, -1).reshape(-1)
