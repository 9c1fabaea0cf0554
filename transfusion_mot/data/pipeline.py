"""From a config to training: the entry point of the data layer, one import for the trainer and tools.

Each job lives in its own file: ``records.py`` (the configured source per split, held-out pairs),
``batches.py`` (prepared examples -> packed ``Batch`` streams, deterministic per position),
``run_codec.py`` (the run's VAE / VQ tokenizer and the latent cache), ``tokenizer.py`` (text).
"""
from __future__ import annotations

from ..config import Config
from .batches import BatchStream, ExampleSource, Prepared, build_stream, collate_batch, examples_per_batch, layout
from .records import HeldOut, build_records, encode_records, iter_records
from .run_codec import check_codec, check_run_codec, load_run_codec, prepare_codec, train_codec_for, vae_key


def prepare_tokenizer(cfg: Config):
    from .tokenizer import build_tokenizer

    return build_tokenizer(cfg.data.tokenizer)


__all__ = ["BatchStream", "ExampleSource", "HeldOut", "Prepared", "build_records", "build_stream", "check_codec",
           "check_run_codec", "collate_batch", "encode_records", "examples_per_batch", "iter_records", "layout",
           "load_run_codec", "prepare_codec", "prepare_tokenizer", "train_codec_for", "vae_key"]
