"""Independent random streams: one per ``(purpose, seed, keys...)`` (DESIGN §1, Randomness).

Every draw with a purpose of its own (an example's crop, its caption, its coins, its image's t, its
image's noise, ...) reads its own stream, so no draw is a function of another. Seeding one generator
with ``seed * C + p`` for every purpose (what this replaced) made the flow noise a function of the data
coins: both read the same Mersenne-Twister stream.

A stream is numpy's PCG64 seeded through ``SeedSequence`` from a 128-bit hash of the purpose name, the
seed and the keys, so streams differ whenever any of the three does (any ints, any size, negative too).
Where an API needs a ``torch.Generator`` (a random crop, token sampling), ``torch_generator`` seeds one
from the stream; torch's CPU generator keeps only 32 bits of its seed, so for the large, many-valued
draws (noise, t, coins) use the numpy stream itself (``stream``, ``normal``).
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

# The purposes draws may have. A name outside this list is an error, so a typo cannot silently open a
# new stream (and change a run's randomness) where the old one was meant.
PURPOSES = (
    "order",  # record order of each epoch of the data
    "shard_order",  # shard order of each epoch of a shard stream
    "crop",  # random crop of an example's image
    "caption",  # which of a record's captions an example uses
    "caption_first",  # caption->image or image->caption
    "dropout",  # caption dropout (classifier-free guidance)
    "flow_t",  # training time t of an image
    "flow_noise",  # training noise of an image
    "vae_images",  # which records a VAE training batch draws
    "sample_noise",  # initial noise of a generated image
    "val_noise",  # fixed noise of the diffusion validation loss
    "decode",  # token sampling in text generation / captioning
    "image_tokens",  # the codes of a generated image (the Chameleon setting, sample_tokens.py)
)


def _entropy(seed: int, keys: tuple[int, ...], purpose: str) -> int:
    if purpose not in PURPOSES:
        raise ValueError(f"unknown random stream purpose {purpose!r}; one of {PURPOSES}")
    parts = (purpose, int(seed), *(int(k) for k in keys))
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=16).digest(), "little")


def stream(seed: int, *keys: int, purpose: str) -> np.random.Generator:
    """The numpy generator of ``purpose`` for ``seed`` and ``keys`` (e.g. an example's position)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(_entropy(seed, keys, purpose))))


def torch_generator(seed: int, *keys: int, purpose: str) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from the stream (for APIs that take one)."""
    return torch.Generator().manual_seed(int(stream(seed, *keys, purpose=purpose).integers(2 ** 63)))


def normal(shape: tuple[int, ...], seed: int, *keys: int, purpose: str) -> torch.Tensor:
    """A float32 standard-normal tensor of ``shape`` from the stream."""
    return torch.from_numpy(stream(seed, *keys, purpose=purpose).standard_normal(tuple(shape), dtype=np.float32))
