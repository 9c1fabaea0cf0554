"""Evaluation metrics: FID / FD-<features> (fid.py, features.py), CLIP score, CIDEr and validation losses.

Import the submodules directly; this file stays light so that ``import transfusion_mot.metrics`` does not
pull in Inception, CLIP or pycocoevalcap.
"""
from __future__ import annotations

from dataclasses import dataclass


class MissingWeights(FileNotFoundError):
    """Weights a metric needs are not on disk. Raised before any generation starts, so an offline run
    stops at once with the file name, where to put it, and the flag that takes a local path."""


@dataclass(frozen=True)
class Score:
    """A metric value with its honest name: "FID" only for the standard Inception, "FD-<net>" otherwise."""

    name: str
    value: float

    def as_dict(self) -> dict[str, float]:
        return {self.name: self.value}


__all__ = ["MissingWeights", "Score"]
