"""Packing: no token lost or duplicated, positions restart per segment, labels never cross a
document boundary, masks and media pads respected (hypothesis property tests)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moonforge.stages.data.packing import IGNORE_INDEX, RowPacker, pack_documents

PAD, MEDIA = 0, 9
docs_st = st.lists(st.lists(st.integers(10, 99), min_size=0, max_size=40), min_size=0, max_size=25)


def _segments(row):
    """(doc id, tokens) of each segment of a row, in order."""
    out: list[tuple[int, list[int]]] = []
    for tok, d in zip(row.input_ids, row.doc_ids):
        if d < 0:
            continue
        if not out or out[-1][0] != d:
            out.append((d, []))
        out[-1][1].append(tok)
    return out


@settings(max_examples=200, deadline=None)
@given(docs=docs_st, seq_len=st.integers(2, 48))
def test_no_token_lost_or_duplicated(docs, seq_len):
    rows = pack_documents(docs, seq_len, pad_id=PAD)
    assert all(len(r.input_ids) == seq_len for r in rows)
    packed = [t for r in rows for t, d in zip(r.input_ids, r.doc_ids) if d >= 0]
    assert packed == [t for d in docs for t in d]
    # Padding only at the end of a row, and every row holds something.
    for r in rows:
        n = sum(d >= 0 for d in r.doc_ids)
        assert n > 0 and r.doc_ids[n:] == [-1] * (seq_len - n) and r.input_ids[n:] == [PAD] * (seq_len - n)


@settings(max_examples=200, deadline=None)
@given(docs=docs_st, seq_len=st.integers(2, 48))
def test_positions_reset_and_labels_stay_inside_documents(docs, seq_len):
    for r in pack_documents(docs, seq_len):
        ids, labels, pos, dids = r.input_ids, r.labels, r.position_ids, r.doc_ids
        for d, seg in _segments(r):
            start = dids.index(d)
            assert pos[start : start + len(seg)] == list(range(len(seg)))
            assert dids.index(d) == start and len(seg) <= seq_len
        for t in range(seq_len):
            if t + 1 < seq_len and dids[t] >= 0 and dids[t] == dids[t + 1]:
                assert labels[t] == ids[t + 1]
            else:
                assert labels[t] == IGNORE_INDEX  # last token of a segment, padding, row end
        assert [d for d in dids if d >= 0] == sorted(d for d in dids if d >= 0)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), seq_len=st.integers(4, 40))
def test_loss_mask_and_media_pads_are_respected(data, seq_len):
    docs = data.draw(
        st.lists(
            st.lists(st.sampled_from([10, 11, 12, MEDIA]), min_size=1, max_size=30), min_size=1, max_size=10
        )
    )
    masks = [data.draw(st.lists(st.integers(0, 1), min_size=len(d), max_size=len(d))) for d in docs]
    rows = pack_documents(docs, seq_len, loss_masks=masks, ignore_ids=(MEDIA,))
    targets = [lab for r in rows for lab in r.labels if lab != IGNORE_INDEX]
    assert MEDIA not in targets
    # Every supervised label is a masked-in token of the same document (checked by count).
    expected = 0
    for d, m in zip(docs, masks):
        for c in range(0, len(d), seq_len):
            chunk, cm = d[c : c + seq_len], m[c : c + seq_len]
            expected += sum(
                1 for j in range(1, len(chunk)) if cm[j] and chunk[j] != MEDIA and chunk[j - 1] != MEDIA
            )
    assert len(targets) == expected


def test_documented_example_and_errors():
    rows = pack_documents([[5, 6, 7], [8, 9]], seq_len=4)
    assert [r.input_ids for r in rows] == [[5, 6, 7, 0], [8, 9, 0, 0]]
    assert rows[0].labels == [6, 7, -100, -100] and rows[1].labels == [9, -100, -100, -100]
    rows = pack_documents([[5, 6], [7, 8]], seq_len=4)
    assert rows[0].labels == [6, -100, 8, -100] and rows[0].position_ids == [0, 1, 0, 1]
    assert rows[0].doc_ids == [0, 0, 1, 1]
    long = pack_documents([list(range(10, 20))], seq_len=4)
    assert [r.input_ids for r in long] == [[10, 11, 12, 13], [14, 15, 16, 17], [18, 19, 0, 0]]
    with pytest.raises(ValueError, match="images"):
        RowPacker(4).add([1, 2, 3, 4, 5], payload=["img"])
    with pytest.raises(ValueError, match="loss mask"):
        RowPacker(4).add([1, 2], loss_mask=[1])
