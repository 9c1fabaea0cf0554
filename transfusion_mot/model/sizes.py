"""Named sizes (DiT's ``DiT_models``, torchtitan's debug model). Plain values, no torch: the config
loader applies them as defaults under YAML and CLI keys, and every size builds as dense, MoT or MoE-4x
through ``model.arch``.

The paper sizes follow the Transfusion paper's table of shapes (the MoT paper's "Transfusion
setting"): 256 px images through an 8x VAE with 8 latent channels, 2x2 patches (256 patches per image),
sequence length 4096. Names count a dense model's parameters. No size fixes the vocabulary: it comes
from the run's tokenizer (the paper's Llama 2: 32,000 ids + pad/BOI/EOI, 32,064 rows), and the latent
shape comes from ``data.resolution`` and the codec wherever the config can derive it (``config.py``);
a paper size's latent shape is the fallback for a codec the config cannot inspect (a hub id).
"""
from __future__ import annotations

LATENT_KEYS = ("latent_channels", "latent_size")  # size values that are fallbacks only (see above)

_PAPER = dict(latent_channels=8, latent_size=32, patch_size=2)

SIZES: dict[str, dict] = {
    # Runs in seconds on a CPU: tests, CI, notebooks.
    "debug": dict(dim=64, n_layers=2, n_heads=4, patch_size=2),
    # CPU minutes: the main job and the small-scale MoT-vs-dense comparison.
    "small": dict(dim=256, n_layers=6, n_heads=4, patch_size=2),
    "163M": dict(dim=768, n_layers=16, n_heads=12, **_PAPER),
    "760M": dict(dim=1536, n_layers=24, n_heads=24, **_PAPER),
    "1.4B": dict(dim=2048, n_layers=24, n_heads=16, **_PAPER),
    "7B": dict(dim=4096, n_layers=32, n_heads=32, **_PAPER),
}
