"""The order a data source's records are visited in: seeded, block-shuffled, sharded, resumable.

Records are numbered 0..n-1 file by file. Each file is cut into blocks of `block` consecutive
records. Epoch e visits the files in a seeded order, each file's blocks in a seeded order and the
records of each block in a seeded order (seeds derive from `seed`, e and the file / block), so
reading stays sequential inside a block (one seek per block, one file open at a time) while the
order is well mixed. With several data-parallel ranks (and loader workers), the epoch's block
sequence is dealt round-robin: slot s = rank * num_workers + worker takes blocks s, s + S,
s + 2S, ... (S slots). So slots never share a record, their shares of an epoch add up to the
epoch exactly, and an uneven tail only means some slots have one block more that epoch: every
slot's stream is endless (epoch after epoch), so nothing waits on an exhausted rank.

State (`state_dict`) is (epoch, block position, offset in the block): restoring it recomputes
that epoch's permutation and continues at the same record, O(number of blocks), never by
re-reading what came before. A position at an epoch's very end simply rolls into the next
epoch on the next draw, so a resume exactly at an epoch boundary trains on (it never sees an
"exhausted" loader), and a second resume in the same epoch restores the same absolute position.

With one file, `block=1` and one slot this is exactly a fresh seeded permutation per epoch
(`random.Random(f"{seed}/{epoch}").shuffle`), the order the generated sources always had.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence


class ShardOrder:
    """Endless record ids of one slot's share (see the module docstring)."""

    def __init__(
        self,
        file_sizes: Sequence[int],
        block: int,
        seed: str,
        slot: int = 0,
        num_slots: int = 1,
        exclude: Collection[int] = (),
    ):
        if block < 1 or not 0 <= slot < num_slots:
            raise ValueError(f"block={block}, slot {slot} of {num_slots}: block >= 1, 0 <= slot < slots")
        self.seed, self.block, self.slot, self.num_slots = seed, block, slot, num_slots
        self.exclude = frozenset(exclude)
        self.files: list[list[tuple[int, int]]] = []
        first = 0
        for size in file_sizes:
            self.files.append([(a, min(a + block, first + size)) for a in range(first, first + size, block)])
            first += size
        self.num_records = first
        num_blocks = sum(len(b) for b in self.files)
        if num_blocks < num_slots:
            raise ValueError(
                f"{first} records in {num_blocks} block(s) of {block} cannot give each "
                f"of {num_slots} data-parallel ranks x workers a block; lower the "
                "shuffle_block, add data, or use fewer ranks / workers"
            )
        if first - sum(1 for i in self.exclude if 0 <= i < first) <= 0:
            raise ValueError("every record is excluded (held out); nothing is left to train on")
        self.epoch, self.pos, self.offset = 0, 0, 0
        self._mine: list[tuple[int, int]] | None = None
        self._items: list[int] | None = None

    def _epoch_blocks(self, epoch: int) -> list[tuple[int, int]]:
        order = list(range(len(self.files)))
        if len(order) > 1:
            random.Random(f"{self.seed}/{epoch}/files").shuffle(order)
        seq: list[tuple[int, int]] = []
        for f in order:
            blocks = list(self.files[f])
            random.Random(
                f"{self.seed}/{epoch}" if len(self.files) == 1 else f"{self.seed}/{epoch}/{f}"
            ).shuffle(blocks)
            seq += blocks
        return seq[self.slot :: self.num_slots]

    def _block_items(self, start: int, end: int) -> list[int]:
        items = list(range(start, end))
        if len(items) > 1:
            random.Random(f"{self.seed}/{self.epoch}/b{start}").shuffle(items)
        return items

    def next(self) -> int:
        """The next record id of this slot's stream."""
        skipped = 0
        while True:
            if self._mine is None:
                self._mine = self._epoch_blocks(self.epoch)
            if self.pos >= len(self._mine):
                self.epoch, self.pos, self.offset, self._mine, self._items = self.epoch + 1, 0, 0, None, None
                continue
            if self._items is None:
                self._items = self._block_items(*self._mine[self.pos])
            if self.offset >= len(self._items):
                self.pos, self.offset, self._items = self.pos + 1, 0, None
                continue
            rid = self._items[self.offset]
            self.offset += 1
            if rid not in self.exclude:
                return rid
            skipped += 1
            if skipped > self.num_records:
                raise ValueError("every record of this rank's share is excluded (held out)")

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "pos": self.pos,
            "offset": self.offset,
            "shape": [self.num_records, self.block, self.num_slots, self.slot],
        }

    def load_state_dict(self, state: dict) -> None:
        shape = [self.num_records, self.block, self.num_slots, self.slot]
        if list(state.get("shape", [])) != shape:
            raise ValueError(
                f"saved data position is for [records, block, slots, slot] = "
                f"{state.get('shape')}, this run has {shape}"
            )
        self.epoch, self.pos, self.offset = int(state["epoch"]), int(state["pos"]), int(state["offset"])
        self._mine, self._items = None, None

    def epoch_ids(self, epoch: int) -> list[int]:
        """Every record id this slot visits in `epoch`, in order (exclusions dropped); for tests
        and checks, without touching the stream's position."""
        saved = self.epoch
        self.epoch = epoch
        try:
            ids = [i for b in self._epoch_blocks(epoch) for i in self._block_items(*b)]
        finally:
            self.epoch = saved
        return [i for i in ids if i not in self.exclude]
