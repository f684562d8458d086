"""Streaming best-fit packing of variable-length documents into fixed rows of `seq_len` tokens.

`RowPacker(open_rows=K)` keeps up to K rows open. A document goes into the open row it fills
best (the least room left after it; ties: the oldest row); if none has room, a new row opens,
and when K are already open the oldest one is padded and closed first. Rows leave in the order
they opened (a full row waits for the rows before it), so the stream keeps its arrival order row
by row, and a document waits at most K rows. K = 1 is next-fit (a document goes into the current
row if it fits, otherwise the row is padded and closed). On long-tailed lengths (log-normal,
median 48, rows of 256: benchmarks/bench_packing.py) next-fit keeps 0.79-0.81 of the tokens
useful and K = 16 0.98, what first-fit-decreasing over the whole set reaches offline; a row then
holds documents that arrived after the next row's, which the batch stream's resume state
records (batches.py). A document
longer than `seq_len` is cut into chunks of at most `seq_len` that are packed as separate
segments. Per token, a row carries:

  doc_ids       index of its segment within the row (0, 1, ...), -1 on padding; the attention
                mask is block-diagonal over equal doc ids.
  position_ids  0, 1, ... restarting at every segment.
  labels        ALREADY SHIFTED: labels[t] is the target of the prediction made at position t,
                i.e. input_ids[t + 1] when t + 1 is in the same segment, is a loss target
                (loss mask 1) and neither t nor t + 1 is an ignored id (media pads); otherwise
                -100. So the loss is cross_entropy(logits_BLV.flatten(0, 1), labels_BL.flatten(),
                ignore_index=-100) with no further shift, and the last token of a segment never
                predicts the first token of the next.

A loss mask is aligned with the document's ids: mask[j] = 1 means token j is supervised (it is
the label at position j - 1). No mask means every token is supervised (plain LM text).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

IGNORE_INDEX = -100


@dataclass
class PackedRow:
    """One packed row of exactly seq_len tokens (lists, converted to tensors by the batcher)."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    doc_ids: list[int]
    payloads: list[Any] = field(default_factory=list)
    """Per-segment payloads (e.g. the images of a document), in row order."""
    tags: list[Any] = field(default_factory=list)
    """Per-segment tags given to `add` (what the segment was; a batch iterator's resume state)."""


_Segment = tuple[list[int], list[int], Any, Any]
"""(ids, loss mask, payload, tag) of one packed piece."""


class RowPacker:
    """Streaming best-fit packer over `open_rows` open rows, closed oldest first (1: next-fit):
    `add` documents, collect the rows it closes, `flush` at the end."""

    def __init__(self, seq_len: int, pad_id: int = 0, ignore_ids: Collection[int] = (), open_rows: int = 1):
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        if open_rows < 1:
            raise ValueError(f"open_rows must be at least 1, got {open_rows}")
        self.seq_len, self.pad_id, self.open_rows = seq_len, pad_id, open_rows
        self.ignore_ids = frozenset(ignore_ids)
        self._open: list[list[_Segment]] = []
        self._used: list[int] = []

    def add(
        self, ids: Sequence[int], loss_mask: Sequence[int] | None = None, payload: Any = None, tag: Any = None
    ) -> list[PackedRow]:
        """Queue one document; return the rows this closed (usually zero or one).

        A document with a payload (images) must fit one row, since its media positions cannot
        be split from the image features that fill them. `tag` (any value) is kept per segment.
        """
        if loss_mask is not None and len(loss_mask) != len(ids):
            raise ValueError(f"loss mask has {len(loss_mask)} entries for {len(ids)} tokens")
        if payload is not None and len(ids) > self.seq_len:
            raise ValueError(
                f"a document with images has {len(ids)} tokens > seq_len={self.seq_len}; "
                "truncate its text or raise seq_len"
            )
        mask = list(loss_mask) if loss_mask is not None else [1] * len(ids)
        rows = []
        for start in range(0, len(ids), self.seq_len):
            chunk = list(ids[start : start + self.seq_len])
            rows += self._place((chunk, mask[start : start + self.seq_len], payload, tag))
        return rows

    def _place(self, seg: _Segment) -> list[PackedRow]:
        n, room = len(seg[0]), self.seq_len
        fits = [i for i, used in enumerate(self._used) if used + n <= room]
        closed = []
        if fits:
            i = min(fits, key=lambda i: (room - self._used[i] - n, i))
        else:
            if len(self._open) == self.open_rows:  # make room: the oldest row goes out
                closed.append(self._close(0))
            self._open.append([])
            self._used.append(0)
            i = len(self._open) - 1
        self._open[i].append(seg)
        self._used[i] += n
        # full rows leave from the front; with one open row a full row waits for the next
        # document instead (next-fit's order of events, kept exactly)
        while self.open_rows > 1 and self._open and self._used[0] == room:
            closed.append(self._close(0))
        return closed

    @property
    def open_tags(self) -> list[list[Any]]:
        """Tags of the segments of each open row (not closed yet), oldest row first."""
        return [[seg[3] for seg in row] for row in self._open]

    def restore_open(self, rows: Sequence[Sequence[_Segment]]) -> None:
        """Reopen rows exactly as `open_tags` listed them (a resumed stream; empty packer only)."""
        if self._open:
            raise ValueError("restore_open needs an empty packer")
        for row in rows:
            if row:
                segs = [(list(ids), [1] * len(ids) if m is None else list(m), p, t) for ids, m, p, t in row]
                self._open.append(segs)
                self._used.append(sum(len(seg[0]) for seg in segs))

    def flush(self) -> list[PackedRow]:
        """Close every open row that holds anything, oldest first."""
        return [self._close(0) for _ in range(len(self._open))]

    def _close(self, i: int) -> PackedRow:
        ids: list[int] = []
        mask: list[int] = []
        pos: list[int] = []
        docs: list[int] = []
        payloads: list[Any] = []
        tags: list[Any] = []
        segments = self._open.pop(i)
        self._used.pop(i)
        for d, (chunk, m, payload, tag) in enumerate(segments):
            ids += chunk
            mask += m
            pos += range(len(chunk))
            docs += [d] * len(chunk)
            tags.append(tag)
            if payload is not None:
                payloads.append(payload)
        pad = self.seq_len - len(ids)
        ids += [self.pad_id] * pad
        mask += [0] * pad
        pos += [0] * pad
        docs += [-1] * pad
        return PackedRow(ids, shifted_labels(ids, mask, docs, self.ignore_ids), pos, docs, payloads, tags)


def shifted_labels(
    ids: Sequence[int], mask: Sequence[int], doc_ids: Sequence[int], ignore_ids: Collection[int]
) -> list[int]:
    """labels[t] = ids[t + 1] if t, t + 1 share a segment, mask[t + 1] and no ignored id; else -100."""
    labels = [IGNORE_INDEX] * len(ids)
    for t in range(len(ids) - 1):
        same = doc_ids[t] >= 0 and doc_ids[t] == doc_ids[t + 1]
        if same and mask[t + 1] and ids[t + 1] not in ignore_ids and ids[t] not in ignore_ids:
            labels[t] = ids[t + 1]
    return labels


def pack_documents(
    docs: Sequence[Sequence[int]],
    seq_len: int,
    loss_masks: Sequence[Sequence[int] | None] | None = None,
    pad_id: int = 0,
    ignore_ids: Collection[int] = (),
) -> list[PackedRow]:
    """Pack all `docs` (in order) into rows of seq_len; `loss_masks[i]` is doc i's mask or None.

    Example: pack_documents([[5, 6, 7], [8, 9]], seq_len=4) gives two rows,
    [5, 6, 7, pad] (labels [6, 7, -100, -100]) and [8, 9, pad, pad] (labels [9, -100, ...]).
    """
    packer = RowPacker(seq_len, pad_id, ignore_ids)
    rows: list[PackedRow] = []
    for i, doc in enumerate(docs):
        rows += packer.add(doc, loss_masks[i] if loss_masks is not None else None)
    return rows + packer.flush()
