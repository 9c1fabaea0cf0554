"""Packing: round trip, row limits, ids and targets line up."""
import pytest
import torch

from transfusion_mot.data.packing import IGNORE, IMAGE, TEXT, document_length, pack, unpack
from transfusion_mot.data.segments import Image, Text

from helpers import SPECIALS, mixed_examples


def test_round_trip_gives_back_segments():
    examples = mixed_examples(seed=1, n=7) + [[Text([1, 2]), Image(torch.randn(4, 8, 8)), Text([3]), Image(torch.randn(4, 8, 8))]]
    batch = pack(examples, seq_len=100, specials=SPECIALS, patch_size=2)
    back = unpack(batch, SPECIALS)
    assert len(back) == len(examples)
    for got, want in zip(back, examples):
        assert [type(s) for s in got] == [type(s) for s in want]
        for g, w in zip(got, want):
            if isinstance(w, Text):
                assert g.ids == w.ids
            else:
                assert torch.equal(g.latent, w.latent)


def test_rows_never_exceed_seq_len_and_documents_are_contiguous():
    examples = mixed_examples(seed=2, n=20)
    batch = pack(examples, seq_len=64, specials=SPECIALS, patch_size=2)
    assert batch.tokens.shape[1] == 64
    assert batch.tokens.shape[0] > 1
    for row in batch.doc_id:
        docs = row[row >= 0]
        assert torch.equal(docs, docs.sort().values)  # documents are contiguous, in order
    total = sum(document_length(e, patch_size=2) for e in examples)
    assert int((batch.doc_id >= 0).sum()) == total


def test_ids_and_targets_line_up():
    examples = [[Text([10, 11]), Image(torch.randn(4, 8, 8))], [Image(torch.randn(4, 8, 8)), Text([12, 13])]]
    b = pack(examples, seq_len=64, specials=SPECIALS, patch_size=2)
    row, tgt = b.tokens[0], b.text_targets[0]
    # doc 0: BOS 10 11 BOI p*16 EOI EOS
    assert row[:4].tolist() == [256, 10, 11, 259]
    assert tgt[:3].tolist() == [10, 11, 259]  # BOS->10, 10->11, 11->BOI (the model learns to start images)
    assert tgt[3] == IGNORE  # BOI predicts no patch
    assert (tgt[4:20] == IGNORE).all() and (b.modality[0, 4:20] == IMAGE).all()
    assert row[20] == 260 and tgt[20] == 257  # EOI -> EOS
    assert (b.image_id[0, 4:20] == 0).all() and (b.image_id[0, :4] == -1).all()
    # doc 1 starts at 22 with positions restarting
    assert b.position[0, 22] == 0 and b.doc_id[0, 22] == 1
    assert b.text_targets[0, 22 + 1 + 1 + 16] == 12  # EOI -> first caption token
    assert (b.text_targets[b.doc_id == -1] == IGNORE).all()  # no loss on padding
    assert (b.modality[b.doc_id == -1] == TEXT).all()
    assert b.conditions_text.tolist() == [False, True]


def test_too_long_example_and_too_many_rows_raise():
    with pytest.raises(ValueError, match="needs 24 tokens but data.seq_len=20"):
        pack([[Text([1] * 4), Image(torch.randn(4, 8, 8))]], 20, SPECIALS, 2)
    with pytest.raises(ValueError, match="need 3 rows"):
        pack([[Text([1] * 20)]] * 3, 24, SPECIALS, 2, n_rows=2)
