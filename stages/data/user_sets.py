"""A declared dataset opened for reading: its files indexed, any record by id, never all at once.

`DeclaredSet(decl, root)` lists the declaration's files (under `root` = data/<name>/, or on S3),
indexes them (record counts and block starts, see user_files.py) and reads records one block at
a time through a small cache, each row normalized by `RowReader` into a `Sample` or a
`BadRecord`. The first `num_heldout` records of a seeded choice are the held-out set; `order()`
gives the training order without them (ShardOrder: seeded, block-shuffled, per-rank slots).
"""

from __future__ import annotations

import random
from collections import Counter, OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import overload

from moonforge.stages.data.declared import FORMATS, DeclaredDataset
from moonforge.stages.data.shard_order import ShardOrder
from moonforge.stages.data.user_files import (
    DatasetFormatError,
    FileCache,
    FileIndex,
    check_parquet_columns,
    index_file,
    list_files,
    read_block,
)
from moonforge.stages.data.user_images import BadRecord
from moonforge.stages.data.user_samples import RowReader, Sample

REQUIRED = {
    "chat": ("messages",),
    "pair": ("text",),
    "text": ("text",),
    "prompt": ("prompt", "ground_truth"),
    "preference": ("prompt", "chosen", "rejected"),
}
"""Fields a record of each kind must have (a Parquet file without their columns is refused)."""


@overload
def resolve(root: Path | str, path: str) -> str: ...
@overload
def resolve(root: Path | str, path: str | None) -> str | None: ...
def resolve(root: Path | str, path: str | None) -> str | None:
    """A declaration path as a local absolute path (relative to `root`) or the s3:// URI."""
    if path is None or path.startswith("s3://"):
        return path
    return str(Path(root) / path)


class DeclaredSet:
    """Records of one declared dataset by id (0..num_records-1, file by file, in file order)."""

    def __init__(self, decl: DeclaredDataset, root: Path | str):
        self.decl, self.root = decl, Path(root)
        self.name, self.kind, self.block = decl.name, decl.kind, decl.shuffle_block
        self.pattern = resolve(root, decl.path)
        self.images_root = resolve(root, decl.images_root)
        self.rows = RowReader(decl, self.images_root)
        self.files: list[FileIndex] = []
        left = decl.num_samples
        for uri in list_files(self.pattern, FORMATS[decl.format].files):
            if left is not None and left <= 0:
                break
            if uri.endswith(".parquet"):
                wanted = {f: col for f in (*REQUIRED[self.kind], *decl.columns) if (col := decl.column(f))}
                check_parquet_columns(uri, wanted)
            fi = index_file(uri, self.block, left)
            self.files.append(fi)
            left = None if left is None else left - fi.num_records
        self.firsts = [0]
        for fi in self.files:
            self.firsts.append(self.firsts[-1] + fi.num_records)
        self.num_records = self.firsts[-1]
        if self.num_records == 0:
            raise DatasetFormatError(f"dataset {self.name!r}: {self.pattern} holds no records")
        k = min(decl.num_heldout, self.num_records - 1)
        self.heldout = sorted(random.Random(f"heldout/{self.name}").sample(range(self.num_records), k))
        self._cache = FileCache()
        self._blocks: OrderedDict = OrderedDict()
        self.skipped: Counter = Counter()
        """Bad records (and undecodable images) met while training, by reason."""

    def __len__(self) -> int:
        return self.num_records

    def _locate(self, rid: int) -> tuple[int, int]:
        import bisect

        if not 0 <= rid < self.num_records:
            raise IndexError(f"record {rid} of {self.name!r} (it has {self.num_records})")
        f = bisect.bisect_right(self.firsts, rid) - 1
        return f, rid - self.firsts[f]

    def _block(self, f: int, k: int) -> list[Sample | BadRecord]:
        key = (f, k)
        if key in self._blocks:
            self._blocks.move_to_end(key)
            return self._blocks[key]
        fi = self.files[f]
        first = k * self.block
        count = min(self.block, fi.num_records - first)
        out: list[Sample | BadRecord] = []
        for rec_key, row in read_block(fi, first, count, self.block, self._cache):
            if isinstance(row, BadRecord):
                out.append(row.at(self._short(rec_key)))
                continue
            try:
                out.append(self.rows.sample(row, self._short(rec_key)))
            except BadRecord as e:
                out.append(e)
        if len(out) != count:
            raise DatasetFormatError(
                f"{fi.uri}: expected {count} records from record {first} on, "
                f"read {len(out)}; the file changed since it was indexed"
            )
        self._blocks[key] = out
        while len(self._blocks) > 4:
            self._blocks.popitem(last=False)
        return out

    def _short(self, key: str) -> str:
        prefix = str(self.root) + "/"
        return key[len(prefix) :] if key.startswith(prefix) else key

    def record(self, rid: int) -> Sample | BadRecord:
        """The Sample of record `rid`, or the BadRecord saying why it cannot be used."""
        f, local = self._locate(rid)
        return self._block(f, local // self.block)[local % self.block]

    def records(self, slot: int = 0, num_slots: int = 1) -> Iterator[tuple[int, Sample | BadRecord]]:
        """(id, record) of every record in file order; with slots, block k goes to slot k % slots
        (how `moonforge data check` and a stage's pre-training check split the work)."""
        k = 0
        for f, fi in enumerate(self.files):
            for b in range(0, fi.num_records, self.block):
                if k % num_slots == slot:
                    for j, rec in enumerate(self._block(f, b // self.block)):
                        yield self.firsts[f] + b + j, rec
                k += 1

    def order(self, seed: str, slot: int = 0, num_slots: int = 1) -> ShardOrder:
        """The training order of one data-parallel slot, held-out records excluded."""
        return ShardOrder(
            [fi.num_records for fi in self.files], self.block, seed, slot, num_slots, exclude=self.heldout
        )
