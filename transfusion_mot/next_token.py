"""The Chameleon setting's objective, apart from the network: one next-token loss over text and image
tokens, each predicted by its own modality's head (``model/chameleon.py``).

The loss is a sum of cross-entropies over every target of the step divided by their count (text and
image targets together, as Chameleon trains), so ``LossParts`` carries it as the LM part with an empty
flow part and the trainer's global normalisation stays exact.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import FlowConfig
from .data.packing import IGNORE, Batch
from .flow import LossParts
from .model.chameleon import next_token_predict


def loss_parts(model, batch: Batch, cfg: FlowConfig | None = None, seed: int = 0) -> LossParts:
    """Run the model once and sum the next-token losses (``cfg`` / ``seed``: the flow objective's
    signature; nothing is random here)."""
    predict = next_token_predict(batch.modality, batch.text_targets)
    out = model(batch, predict=predict)
    flat_targets = batch.text_targets.reshape(-1)
    sums = []
    for m, logits in out.logits.items():
        targets = flat_targets[out.index[m]]  # (N_m,) ids in modality m's vocabulary
        sums.append(F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum"))
    device = batch.tokens.device
    return LossParts(lm_sum=torch.stack(sums).sum(), lm_count=(flat_targets != IGNORE).sum(),
                     flow_sum=torch.zeros((), device=device),
                     flow_count=torch.zeros((), dtype=torch.long, device=device), aux=out.aux_loss)
