"""Greedy packing of variable-length documents into fixed rows of `seq_len` tokens.

Documents are placed in order (next-fit): a document goes into the current row if it fits,
otherwise the row is padded and closed. A document longer than `seq_len` is cut into chunks of
at most `seq_len` that are packed as separate segments. Per token, a row carries:

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


class RowPacker:
    """Streaming next-fit packer: `add` documents, collect the rows it closes, `flush` at the end."""

    def __init__(self, seq_len: int, pad_id: int = 0, ignore_ids: Collection[int] = ()):
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        self.seq_len, self.pad_id = seq_len, pad_id
        self.ignore_ids = frozenset(ignore_ids)
        self._segments: list[tuple[list[int], list[int], Any, Any]] = []
        self._used = 0

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
            if self._used + len(chunk) > self.seq_len:
                rows.append(self._close())
            self._segments.append((chunk, mask[start : start + self.seq_len], payload, tag))
            self._used += len(chunk)
        return rows

    @property
    def open_tags(self) -> list[Any]:
        """Tags of the segments of the row being filled (not closed yet)."""
        return [seg[3] for seg in self._segments]

    def flush(self) -> list[PackedRow]:
        """Close the current row if it holds anything."""
        return [self._close()] if self._segments else []

    def _close(self) -> PackedRow:
        ids: list[int] = []
        mask: list[int] = []
        pos: list[int] = []
        docs: list[int] = []
        payloads: list[Any] = []
        tags: list[Any] = []
        for d, (chunk, m, payload, tag) in enumerate(self._segments):
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
        self._segments, self._used = [], 0
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
