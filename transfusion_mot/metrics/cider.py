"""Captioning CIDEr (CIDEr-D, as the COCO caption evaluation and Transfusion report it) via pycocoevalcap.

The COCO toolkit tokenises with the Stanford PTB tokenizer, which needs Java. We tokenise in Python
instead (lowercase, drop punctuation, split on whitespace): close to PTB for ordinary captions, and it
keeps evaluation dependency-free. Scores are comparable across our runs; against published numbers they
can differ slightly on captions with contractions or hyphens.
"""
from __future__ import annotations

import re
from collections.abc import Hashable, Mapping, Sequence

_APOSTROPHES = re.compile(r"['\u2019]")
_NON_WORD = re.compile(r"[^\w\s]|_")


def tokenize(text: str) -> str:
    """Lowercase, strip punctuation, single spaces: "A dog's ball." -> "a dogs ball"."""
    text = _NON_WORD.sub(" ", _APOSTROPHES.sub("", text.lower()))
    return " ".join(text.split())


def cider(refs: Mapping[Hashable, Sequence[str]], hyps: Mapping[Hashable, str]) -> float:
    """Corpus CIDEr-D of one hypothesis per key against that key's reference captions.

    The idf weights come from the references of all keys, so score a whole test set in one call.
    """
    from ..extras import require

    Cider = require("pycocoevalcap.cider.cider", "eval").Cider

    missing, extra = set(refs) - set(hyps), set(hyps) - set(refs)
    if missing or extra:
        raise ValueError(f"refs and hyps must have the same keys: {len(missing)} without a hypothesis "
                         f"(e.g. {next(iter(missing), None)!r}), {len(extra)} without references "
                         f"(e.g. {next(iter(extra), None)!r})")
    if not refs:
        raise ValueError("cider needs at least one key")
    gts: dict[Hashable, list[str]] = {}
    res: dict[Hashable, list[str]] = {}
    for key, captions in refs.items():
        if isinstance(captions, str) or not captions:
            raise ValueError(f"refs[{key!r}] must be a non-empty list of captions, got {captions!r}")
        if not isinstance(hyps[key], str):
            raise ValueError(f"hyps[{key!r}] must be one caption string, got {type(hyps[key]).__name__}")
        gts[key] = [tokenize(c) for c in captions]
        res[key] = [tokenize(hyps[key])]
    score, _ = Cider().compute_score(gts, res)
    return float(score)
