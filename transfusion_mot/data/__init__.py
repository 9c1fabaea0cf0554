"""Data: sources, tokenizers, latents and packing (DESIGN §4)."""
