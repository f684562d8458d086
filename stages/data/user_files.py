"""Users' files: which files a declaration names, how many records each holds, and reading a
block of records from any of them, locally or on S3 (fsspec / s3fs), without loading a file whole.

File types (by extension): `.jsonl` (one JSON object per line: read line by line, so a non-UTF-8
or broken line is one bad record with its line number), `.json` (one JSON array of records;
parsed whole, one file at a time), `.parquet` (pyarrow, one row group at a time), `.tar`
(WebDataset shards: Hugging Face `datasets`' own tar iteration and sample grouping, from the
tar header of the block's first sample). A JSON array in a `.jsonl` file and JSON Lines in a
`.json` file are refused, naming the fix.

The index (`index_files`) is what sharding and exact resume address records by: per file its
record count and, every `block` records, where that record starts (a byte offset for `.jsonl`
and `.tar`, a row number for `.parquet`), so any block is read without reading what precedes it.
"""

from __future__ import annotations

import bisect
import glob as globmod
import json
import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moonforge.stages.data.user_images import BadRecord

GLOB_CHARS = "*?["


class DatasetFormatError(ValueError):
    """A declared dataset cannot be read at all (no files, wrong file type, a broken file)."""


@dataclass(frozen=True)
class FileIndex:
    """One file of a declared dataset: where it is, its type, its records and block starts."""

    uri: str
    kind: str
    """jsonl, json, parquet or tar."""
    num_records: int
    starts: tuple[int, ...] = ()
    """Start of record k * block (byte offset for jsonl / tar; unused for json / parquet)."""
    row_groups: tuple[int, ...] = ()
    """parquet: first row of every row group."""
    lines: tuple[int, ...] = ()
    """jsonl: the line number (1-based) of record k * block."""


def _fs(uri: str):
    import fsspec

    return fsspec.core.url_to_fs(uri)


def _exists(uri: str) -> bool:
    fs, path = _fs(uri)
    return fs.exists(path)


def list_files(pattern: str, extensions: tuple[str, ...]) -> list[str]:
    """Files of a declaration's resolved path: one file, every matching file under a directory,
    or the matches of a glob; sorted; each must have one of `extensions`."""
    is_s3 = pattern.startswith("s3://")
    if any(c in pattern for c in GLOB_CHARS):
        if is_s3:
            fs, _ = _fs(pattern)
            found = ["s3://" + p for p in fs.glob(pattern)]
        else:
            found = [p for p in globmod.glob(pattern, recursive=True) if os.path.isfile(p)]
    elif is_s3:
        fs, path = _fs(pattern)
        if fs.isdir(path):
            found = ["s3://" + p for p in fs.find(path)]
            found = [p for p in found if p.rsplit(".", 1)[-1] in extensions]
        elif fs.exists(path):
            found = [pattern]
        else:
            raise DatasetFormatError(
                f"no S3 object or prefix at {pattern} (missing S3 object); "
                "check the declaration's path and the bucket"
            )
    elif os.path.isdir(pattern):
        found = [
            str(p)
            for p in sorted(Path(pattern).rglob("*"))
            if p.is_file()
            and p.suffix.lstrip(".") in extensions
            and not any(part.startswith(".") for part in p.relative_to(pattern).parts)
        ]
    elif os.path.isfile(pattern):
        found = [pattern]
    else:
        raise DatasetFormatError(
            f"no file at {pattern}; check the declaration's path (relative paths are inside data/<name>/)"
        )
    found = sorted(found)
    if not found:
        raise DatasetFormatError(f"{pattern}: no .{'/.'.join(extensions)} files there")
    for f in found:
        ext = f.rsplit(".", 1)[-1].lower() if "." in f.rsplit("/", 1)[-1] else ""
        if ext not in extensions:
            raise DatasetFormatError(
                f"{f}: this format reads .{'/.'.join(extensions)} files, "
                f"not {'.' + ext if ext else 'files without an extension'}"
            )
    return found


def _open(uri: str):
    fs, path = _fs(uri)
    try:
        return fs.open(path, "rb")
    except FileNotFoundError:
        what = "missing S3 object" if uri.startswith("s3://") else "no such file"
        raise DatasetFormatError(f"{uri}: {what}") from None


def index_file(uri: str, block: int, limit: int | None = None) -> FileIndex:
    """Count the records of one file and note where every `block`-th one starts."""
    kind = uri.rsplit(".", 1)[-1].lower()
    if kind == "jsonl":
        return _index_jsonl(uri, block, limit)
    if kind == "json":
        return FileIndex(uri, "json", min(len(_load_json(uri)), limit or 1 << 62))
    if kind == "parquet":
        import pyarrow.parquet as pq

        with _open(uri) as f:
            meta = pq.ParquetFile(f).metadata
        starts, total = [], 0
        for g in range(meta.num_row_groups):
            starts.append(total)
            total += meta.row_group(g).num_rows
        return FileIndex(uri, "parquet", min(total, limit or total), row_groups=tuple(starts))
    if kind == "tar":
        return _index_tar(uri, block, limit)
    raise DatasetFormatError(f"{uri}: cannot read .{kind} files")


def _index_jsonl(uri: str, block: int, limit: int | None) -> FileIndex:
    starts, lines, n, offset = [], [], 0, 0
    with _open(uri) as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                if n == 0:
                    _refuse_array(uri, line)
                if limit is not None and n >= limit:
                    break
                if n % block == 0:
                    starts.append(offset)
                    lines.append(lineno)
                n += 1
            offset += len(line)
    return FileIndex(uri, "jsonl", n, tuple(starts), lines=tuple(lines))


def _refuse_array(uri: str, first_line: bytes) -> None:
    head = first_line.lstrip()[:1]
    if head == b"[":
        raise DatasetFormatError(
            f"{uri}: a JSON array given as JSON Lines (.jsonl): the file "
            "starts with '['; name it .json, or write one object per line"
        )


def _load_json(uri: str) -> list:
    with _open(uri) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DatasetFormatError(
            f"{uri}: not UTF-8 at byte {e.start}; a .json file is one "
            "JSON document and must be UTF-8 throughout"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        first = text.lstrip().split("\n", 1)[0]
        try:
            lines_like = isinstance(json.loads(first), dict)
        except json.JSONDecodeError:
            lines_like = False
        if lines_like and e.msg == "Extra data":
            raise DatasetFormatError(
                f"{uri}: JSON Lines given as a JSON array (.json): one object per line; name it .jsonl"
            ) from None
        raise DatasetFormatError(f"{uri}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise DatasetFormatError(
            f"{uri}: holds a JSON {type(data).__name__}, not an array of "
            "records (LLaVA / ShareGPT .json files are one array)"
        )
    return data


def _tar_key(name: str) -> str | None:
    from datasets.packaged_modules.webdataset.webdataset import base_plus_ext

    if os.path.basename(name).startswith((".", "__")):
        return None
    return base_plus_ext(name)[0]


def _index_tar(uri: str, block: int, limit: int | None) -> FileIndex:
    import tarfile

    starts, n, last = [], 0, None
    try:
        with _open(uri) as f, tarfile.open(fileobj=f, mode="r:") as tf:
            for m in tf:
                if not m.isreg():
                    continue
                key = _tar_key(m.name)
                if key is None or key == last:
                    continue
                last = key
                if limit is not None and n >= limit:
                    break
                if n % block == 0:
                    starts.append(m.offset)
                n += 1
    except tarfile.TarError as e:
        raise DatasetFormatError(f"{uri}: not a readable tar archive ({e})") from None
    return FileIndex(uri, "tar", n, tuple(starts))


class _Failed:
    """A tar member whose decoder (json / text) failed: the sample becomes a BadRecord."""

    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail


def _tolerant_pipeline():
    from datasets.packaged_modules.webdataset.webdataset import WebDataset

    def safe(fn):
        def decode(data):
            try:
                return fn(data)
            except UnicodeDecodeError:
                return _Failed("not_utf8", "a text member is not UTF-8")
            except (ValueError, TypeError) as e:
                return _Failed("not_json", f"a member does not decode ({e})")

        return decode

    class Tolerant(WebDataset):
        DECODERS = {k: safe(v) for k, v in WebDataset.DECODERS.items()}

    return Tolerant


def read_block(
    fi: FileIndex, first: int, count: int, block: int, cache: FileCache
) -> Iterator[tuple[str, Any]]:
    """(key, row dict or BadRecord) for records first .. first + count - 1 of one file;
    `first` is a multiple of `block`. Keys: file:line (jsonl), file[i] (json), file#row
    (parquet), file:KEY (tar)."""
    name = fi.uri
    if fi.kind == "jsonl":
        with _open(fi.uri) as f:
            f.seek(fi.starts[first // block])
            n = 0
            for lineno, line in enumerate(f, start=fi.lines[first // block]):
                if not line.strip():
                    continue
                if n >= count:
                    break
                yield f"{name}:{lineno}", _json_line(line)
                n += 1
        return
    if fi.kind == "json":
        rows = cache.get(("json", fi.uri), lambda: _load_json(fi.uri))
        for i in range(first, first + count):
            yield f"{name}[{i}]", rows[i]
        return
    if fi.kind == "parquet":
        yield from _parquet_rows(fi, first, count, cache)
        return
    yield from _tar_rows(fi, first, count, block)


def _json_line(line: bytes) -> Any:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadRecord("not_utf8", f"line is not UTF-8 (byte {e.start}: {line[e.start : e.start + 1]!r})")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return BadRecord("not_json", f"not valid JSON ({e.msg} at column {e.colno})")


def _parquet_rows(fi: FileIndex, first: int, count: int, cache: FileCache):
    import pyarrow.parquet as pq

    end = first + count
    g = bisect.bisect_right(fi.row_groups, first) - 1
    while first < end:
        start = fi.row_groups[g]

        def load(g=g):
            with _open(fi.uri) as f:
                return pq.ParquetFile(f).read_row_group(g).to_pylist()

        rows = cache.get(("parquet", fi.uri, g), load)
        stop = min(end, start + len(rows))
        for i in range(first, stop):
            yield f"{fi.uri}#{i}", rows[i - start]
        first, g = stop, g + 1


def _tar_rows(fi: FileIndex, first: int, count: int, block: int):
    from datasets.utils.file_utils import ArchiveIterable

    pipeline = _tolerant_pipeline()
    with _open(fi.uri) as f:
        f.seek(fi.starts[first // block])
        samples = pipeline._get_pipeline_from_tar(fi.uri, ArchiveIterable._iter_tar(f))
        for n, sample in enumerate(samples):
            if n >= count:
                break
            failed = next((v for v in sample.values() if isinstance(v, _Failed)), None)
            key = f"{fi.uri}:{sample.get('__key__')}"
            yield key, BadRecord(failed.reason, failed.detail) if failed else sample


class FileCache:
    """The few most recently parsed things (a .json file, a parquet row group), by key."""

    def __init__(self, size: int = 2):
        self.size = size
        self._items: OrderedDict[Any, Any] = OrderedDict()

    def get(self, key, load):
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = load()
        self._items[key] = value
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return value


def check_parquet_columns(uri: str, wanted: dict[str, str]) -> None:
    """A column the declaration maps (`wanted`: field -> column, the required fields and the
    user-mapped ones) that the Parquet schema lacks is a DatasetFormatError naming the columns
    the file has."""
    import pyarrow.parquet as pq

    with _open(uri) as f:
        names = set(pq.ParquetFile(f).schema_arrow.names)
    for field, col in wanted.items():
        if col.split(".")[0] not in names:
            raise DatasetFormatError(
                f"{uri}: column {col!r} (mapped from {field!r}) is absent; "
                f"the file has columns {sorted(names)}"
            )
