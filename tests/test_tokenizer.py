"""Tokenizers: byte round-trip, specials outside the text range, and the GPT-2 / Llama 2 files from
../shared/assets loaded by path with the ids the MANIFEST lists."""
from __future__ import annotations

from pathlib import Path

import pytest

from transfusion_mot.data.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer

from helpers import SPECIALS, VOCAB

CAPTIONS = ["A child in a pink dress is climbing up a set of stairs in an entry way .",
            "Two dogs, one black and one brown, play in the snow.",
            "un café à Paris — 東京 🐕 <|endoftext|> </s>"]


def specials_of(tok) -> list[int]:
    return [tok.bos_id, tok.eos_id, tok.pad_id, tok.boi_id, tok.eoi_id]


def test_byte_tokenizer_round_trip_and_specials():
    tok = build_tokenizer("bytes")
    assert isinstance(tok, ByteTokenizer) and tok.name == "bytes"
    assert specials_of(tok) == [SPECIALS.bos, SPECIALS.eos, SPECIALS.pad, SPECIALS.boi, SPECIALS.eoi]
    assert tok.vocab_size == VOCAB and len(set(specials_of(tok))) == 5
    for text in CAPTIONS:
        ids = tok.encode(text)
        assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode("utf-8"))
        assert tok.decode([tok.bos_id, *ids, tok.boi_id, tok.eoi_id, tok.eos_id, tok.pad_id]) == text
    assert tok.encode("é") == [0xC3, 0xA9] and tok.decode([0xC3]) == "\ufffd"  # half a character: replaced


def test_shapes_words_tokenizer_one_id_per_word():
    from transfusion_mot.data import shapes
    from transfusion_mot.metrics import shapes_checker

    tok = build_tokenizer("shapes-words")
    assert tok.name == "shapes-words" and len(set(specials_of(tok))) == 5
    assert all(i >= len(shapes.vocabulary()) + 1 for i in specials_of(tok))  # after <unk> + the words
    assert tok.vocab_size == len(shapes.vocabulary()) + 1 + 5
    for text in shapes_checker.held_out_prompts(50):
        ids = tok.encode(text)
        assert len(ids) == len(text.split()) and 0 not in ids  # every grammar word is known
        assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text
    assert tok.encode("A RED circle") == tok.encode("a red circle")
    assert tok.encode("a red dog")[-1] == 0  # unknown word -> <unk>, not an error
    with pytest.raises(ValueError, match="data.tokenizer is empty"):
        build_tokenizer("")


def test_gpt2_by_path(assets_dir: Path):
    tok = build_tokenizer(str(assets_dir / "tokenizers" / "gpt2-hf"))
    assert isinstance(tok, HFTokenizer)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.bos_id == tok.eos_id == 50256  # GPT-2 has one <|endoftext|> for both
    assert sorted([tok.pad_id, tok.boi_id, tok.eoi_id]) == [50257, 50258, 50259]  # appended after 50,257
    assert tok.vocab_size == 50260
    for text in CAPTIONS:
        ids = tok.encode(text)
        assert max(ids) < 50256  # a literal "<|endoftext|>" in a caption stays text
        assert tok.decode([tok.bos_id, *ids, tok.boi_id, tok.eoi_id, tok.eos_id, tok.pad_id]) == text


def test_llama2_sentencepiece_by_path(assets_dir: Path):
    model = assets_dir / "tokenizers" / "llama2" / "tokenizer.model"
    tok = build_tokenizer(str(model))
    assert tok.encode("Hello world") == [15043, 3186]
    assert (tok.bos_id, tok.eos_id) == (1, 2)  # Llama 2's own
    assert [tok.pad_id, tok.boi_id, tok.eoi_id] == [32000, 32001, 32002] and tok.vocab_size == 32003
    for text in CAPTIONS:
        ids = tok.encode(text)
        assert ids and not set(ids) & set(specials_of(tok))
        assert tok.decode([tok.bos_id, *ids, tok.boi_id, tok.eoi_id, tok.eos_id]) == text
    assert build_tokenizer(str(model.parent)).encode("Hello world") == [15043, 3186]  # the folder works too


def test_missing_tokenizer_is_a_clear_error(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="no-such-tokenizer"):
        build_tokenizer(str(tmp_path / "no-such-tokenizer"))
    with pytest.raises(ValueError, match="data.tokenizer"):
        build_tokenizer("")
