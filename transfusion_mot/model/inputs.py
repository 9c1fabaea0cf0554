"""The network's own input (issue 21): what the Transfusion model reads, owned by ``model/``.

The data layer's packed ``Batch`` (``data/packing.py``) extends it with the training-only fields (next-token
targets, the flow's seeds, captioning flags); samplers build a ``ModelInput`` directly, so nothing is faked.

Continuous images are packed flat: ``patches`` holds every image's latent patches, image after image in
sequence order (the order of the IMAGE positions in the flattened (B*T) sequence), each image in raster
order, and ``image_shape`` each image's own latent shape, so images of different sizes and aspect
ratios share one batch with no stack of equal shapes.

Plug-in modalities (ids 2.., ``model.extra_modalities``, adapters registered by name in ``adapters.py``)
bring their continuous vectors flat per modality in ``values`` and their per-position side input (the
flow time) in ``time``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import torch

from .layers import patch_counts

TEXT, IMAGE = 0, 1  # modality ids of the two-modality settings; the backbone itself knows only groups 0..M-1


@dataclass(kw_only=True)
class ModelInput:
    tokens: torch.Tensor  # (B, T) discrete ids; pad id at patch and padding positions
    modality: torch.Tensor  # (B, T) TEXT / IMAGE
    doc_id: torch.Tensor  # (B, T) document index within the batch, -1 on padding
    image_id: torch.Tensor  # (B, T) the image a patch belongs to (bidirectional span), -1 off images
    position: torch.Tensor  # (B, T) position inside the document (RoPE)
    patches: torch.Tensor  # (P, C*p*p) latent patches of every image (noised by flow.py in training)
    image_shape: torch.Tensor  # (N, 3) long: each image's own latent shape (C, h, w)
    t: torch.Tensor  # (N,) flow time per image (0 = clean)
    values: dict[int, torch.Tensor] = field(default_factory=dict)  # m -> (N_m, d_m) at m's positions, in order
    time: dict[int, torch.Tensor] = field(default_factory=dict)  # m -> (N_m,) flow time per position

    def to(self, device, dtype: torch.dtype | None = None):
        """Every tensor on ``device``; ``dtype`` casts the continuous inputs (patches, values)."""
        def move(x, cast: bool):
            if isinstance(x, dict):
                return {k: move(v, cast) for k, v in x.items()}
            x = x.to(device, non_blocking=True)
            return x.to(dtype) if cast and dtype is not None else x

        return type(self)(**{f.name: move(getattr(self, f.name), f.name in ("patches", "values"))
                             for f in fields(self)})

    def replace(self, **changes):
        return replace(self, **changes)

    @property
    def n_images(self) -> int:
        return self.image_shape.shape[0]

    @property
    def patch_size(self) -> int:
        """p, from the patches' width C*p*p and the channel count (0 in a batch without images)."""
        if self.n_images == 0:
            return 0
        return math.isqrt(self.patches.shape[1] // int(self.image_shape[0, 0]))

    def patch_counts(self) -> torch.Tensor:
        """(N,) patches of each image, from its own latent shape."""
        if self.n_images == 0:
            return torch.zeros(0, dtype=torch.long, device=self.image_shape.device)
        return patch_counts(self.image_shape, self.patch_size)
