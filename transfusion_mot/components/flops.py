"""FLOPs per token the way the PaLM and MoT papers count them, a measured count to check it against,
and the parameter table of every named size (``transfusion-mot params``).

What ``model_flops_per_token`` counts (one multiply-add = 2 FLOPs; forward = 2 FLOPs per weight a
token meets, backward twice the forward, so training = 3x forward = 6 per weight):

* Backbone matmuls: the **active** non-embedding weight matrices of every layer, i.e. the ones a
  single token is multiplied by. MoT: one modality group's QKV, output projection and SwiGLU (the
  other groups' weights exist but this token never meets them, so MoT FLOPs == dense FLOPs).
  MoE-4x: the router plus ``capacity`` experts on average under expert choice (a document's n real
  tokens fill round(capacity * n) expert slots) and the causal router's predictor, exactly one expert
  under token choice.
* Attention scores and values: ``QK^T`` and ``AV`` over the **full** T x T square, 4·D·T per layer
  forward (PaLM's 12·L·H·Q·T for training). This is what SDPA computes with a boolean mask; flex
  attention skips masked blocks, so it does less work than is counted here (as in the papers).
* Heads and embeddings as seen per token, weighted by the text share of tokens: the LM head (D x V)
  on text positions; the patch embedding and velocity head (D x C·p², each) on image positions, plus
  the timestep MLP (run once per image) spread over that image's patches; in the Chameleon setting the
  image head is the softmax head over the VQ codebook (D x image_vocab_size). The embedding lookup, norms,
  RoPE, softmax and activations are not counted (elementwise work, not matmuls; neither does
  ``torch.utils.flop_counter``).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from ..config import ModelConfig, load_config
from ..model import padded_vocab
from ..model.sizes import SIZES

TIMESTEP_FREQ_DIM = 256  # TimestepEmbedding's sinusoid width (model/layers.py)
BYTE_VOCAB = 256 + 5  # the "bytes" tokenizer: 256 byte ids + BOS, EOS, pad, BOI, EOI
PAPER_TOKENIZER_VOCAB = 32000 + 3  # Llama 2's sentencepiece ids + the pad, BOI and EOI data/tokenizer.py appends
PAPER_SEQ_LEN = 4096  # the MoT / Transfusion papers' training context
# The papers' image setting: 256 px through an 8-channel 8x VAE (said here with our trained VAE's shape
# knobs: four blocks, three 2x downsamplings), so a paper size's latent is 8 x 32 x 32: 256 patches of 2 x 2.
PAPER_DATA = ("data.resolution=256", "codec.vae_latent_channels=8", "codec.vae_channels=[64,64,64,64]")


def size_data(size: str) -> tuple[str, ...]:
    """Overrides giving a named size the images of its configs, hence their latent shape: debug.yaml's
    32 px and small_*.yaml's 64 px through the trained 4x VAE (4 x 8 x 8, 4 x 16 x 16), the papers' above."""
    return {"debug": ("data.resolution=32",), "small": ("data.resolution=64",)}.get(size, PAPER_DATA)


def active_matmul_params(cfg: ModelConfig) -> dict[str, float]:
    """Weights one token is multiplied by, per part: backbone, text head, image head (see module doc)."""
    bb = cfg.backbone
    d = bb.dim
    ffn = 3 * d * bb.hidden  # SwiGLU: w1 and w3 (fused, D x 2H) and w2 (H x D)
    if cfg.moe:
        expert_choice = bb.moe_routing == "expert_choice"
        experts = bb.moe_capacity if expert_choice else 1.0
        routers = 2 if expert_choice else 1  # expert choice: the router and its causal predictor
        ffn = routers * d * bb.moe_experts + experts * ffn  # + the experts a token visits on average
    backbone = bb.n_layers * (4 * d * d + ffn)  # QKV (D x 3D) + output (D x D) + feed-forward
    patch_dim = cfg.latent_channels * cfg.patch_size ** 2
    n_patches = (cfg.latent_size // cfg.patch_size) ** 2
    t_mlp = TIMESTEP_FREQ_DIM * d + d * d  # once per image
    image_head = 2.0 * d * patch_dim + t_mlp / n_patches
    if cfg.setting == "chameleon":  # image tokens: a softmax head over the codebook (the lookup is not counted)
        image_head = float(d * cfg.image_vocab_size)
    return {"backbone": float(backbone), "text_head": float(d * cfg.vocab_size), "image_head": image_head}


def model_flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True,
                          text_fraction: float = 0.5) -> float:
    """PaLM / MoT-paper model FLOPs per token: 6·N_active (+ heads) + 12·L·D·seq for training, a
    third of that for a forward pass. ``text_fraction`` is the share of text tokens (the rest are
    image patches); it weighs the LM head against the image head. The module doc says what is counted.
    """
    if cfg.vocab_size < 1:
        raise ValueError("model.vocab_size must be set to count the LM head's FLOPs (got 0)")
    if not 0.0 <= text_fraction <= 1.0:
        raise ValueError(f"text_fraction={text_fraction} must lie in [0, 1]")
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    p = active_matmul_params(cfg)
    weights = p["backbone"] + text_fraction * p["text_head"] + (1.0 - text_fraction) * p["image_head"]
    forward = 2.0 * weights + 4.0 * cfg.backbone.n_layers * cfg.backbone.dim * seq_len
    return 3.0 * forward if training else forward


# flop_counter has no formula for the CPU flash kernel that SDPA dispatches to, so on CPU it would
# count attention as 0. Register the same full-square count it uses for the CUDA kernels.
def _cpu_sdpa(query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


_CPU_SDPA = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
}


def measured_flops(model: torch.nn.Module, batch, backward: bool = False) -> int:
    """FLOPs torch.utils.flop_counter sees in ``model(batch)`` (and, with ``backward``, in the
    backward pass of a scalar made from the outputs). Gradients it leaves are cleared."""
    with FlopCounterMode(display=False, custom_mapping=_CPU_SDPA) as counter:
        out = model(batch)
        if backward:
            (out.logits.float().sum() + out.velocity.float().sum()).backward()
    if backward:
        model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def size_config(size: str, arch: str) -> tuple[ModelConfig, int]:
    """The model config of a named size and arch, with a vocabulary (the bytes tokenizer's for debug and
    small, Llama 2's for the paper sizes, rounded as ``build_model`` rounds it), and the size's sequence length."""
    paper = size not in ("debug", "small")
    overrides = [f"model.size={size}", f"model.arch={arch}", *size_data(size)]
    if paper:
        overrides.append(f"data.seq_len={PAPER_SEQ_LEN}")
    cfg = load_config(None, overrides)
    model = cfg.model
    if not model.vocab_size:
        model = dataclasses.replace(model, vocab_size=padded_vocab(PAPER_TOKENIZER_VOCAB if paper else BYTE_VOCAB))
    return model, cfg.data.seq_len


def param_table(sizes: tuple[str, ...] = tuple(SIZES),
                archs: tuple[str, ...] = ("dense", "mot", "moe")) -> list[dict[str, Any]]:
    """One row per size x arch, each model built on the meta device (no memory, seconds for all)."""
    from ..model import build_model

    rows = []
    for size in sizes:
        for arch in archs:
            cfg, seq_len = size_config(size, arch)
            with torch.device("meta"):
                model = build_model(cfg)
            rows.append({
                "size": size, "arch": arch, "seq_len": seq_len,
                "total": model.num_params(),
                "total_nonemb": model.num_params(embeddings=False),
                "backbone": sum(p.numel() for p in model.backbone.parameters()),
                "active": model.num_params(active=True),
                "active_nonemb": model.num_params(active=True, embeddings=False),
                "flops_per_token": model_flops_per_token(cfg, seq_len),
            })
    return rows


def _human(n: float, billion: str = "B") -> str:
    """Parameters in K/M/B, FLOPs in K/M/G/T (``billion="G"``)."""
    for unit, scale in (("T", 1e12), (billion, 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = ("| size | arch | seq_len | total params | total non-emb | backbone | active / token "
            "| active non-emb | train FLOPs / token |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['size']} | {r['arch']} | {r['seq_len']} | {_human(r['total'])} | "
                     f"{_human(r['total_nonemb'])} | {_human(r['backbone'])} | {_human(r['active'])} | {_human(r['active_nonemb'])} | "
                     f"{_human(r['flops_per_token'], billion='G')} |")
    return "\n".join(lines)


def main() -> None:
    """Print the parameter and FLOP table of every named size (``transfusion-mot params``)."""
    print(markdown_table(param_table()))
    print("\nFLOPs/token: training (6 per active weight + 12·L·D·seq attention), 50/50 text/image tokens; "
          "embedding = token embedding + LM head. See transfusion_mot/components/flops.py.")


if __name__ == "__main__":
    main()
