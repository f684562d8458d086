"""Real English text that ships with every Python: the standard library's docstrings.

No download is possible at build time, so the text corpus and the long-document filler come
from the stdlib sources of the running interpreter. Docstrings are read with `ast` (parsing, not
importing: importing all of the stdlib would run module side effects such as `antigravity`
opening a browser, and differ by platform). Files are visited in a fixed pseudo-random order
(sha1 of the relative path) so that a character budget samples many modules instead of the
alphabetical head; third-party site-packages, test suites and generated tables are excluded.
The language-reference topics of `pydoc_data` (the text `help("assert")` prints) come first.
The result is a pure function of the interpreter's stdlib (Python is pinned to 3.11).
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import os
import sysconfig
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

EXCLUDED_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idle_test",
        "__pycache__",
        "encodings",
        "turtledemo",
        "ensurepip",
        "pydoc_data",
        "lib2to3",
        "config-3.11-x86_64-linux-gnu",
    }
)
"""Directories whose files are not prose-bearing library code (or not stdlib at all)."""

MIN_DOC_CHARS = 40
"""Shorter docstrings ("Return self==value.") are boilerplate repeated across the stdlib."""


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Stdlib .py files in the fixed sha1(relative path) order."""
    root = root or stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS and not d.startswith("config-")]
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return sorted(files, key=lambda p: hashlib.sha1(p.relative_to(root).as_posix().encode()).hexdigest())


def pydoc_topics(root: Path | None = None) -> list[tuple[str, str]]:
    """The language-reference topics of `pydoc_data/topics.py` (plain text), sorted by name.

    Read with `ast.literal_eval` rather than imported, like the rest of this module.
    """
    path = (root or stdlib_root()) / "pydoc_data" / "topics.py"
    if not path.is_file():
        return []
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "topics":
            topics = ast.literal_eval(node.value)
            return [(f"pydoc_topics.{k}", topics[k].strip()) for k in sorted(topics)]
    return []


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def file_docstrings(path: Path, root: Path) -> Iterator[tuple[str, str]]:
    """(qualified name, cleaned docstring) for the module, its classes and functions, in source order."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError):
        return
    module = _module_name(path, root)

    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, str]]:
        doc = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
        if doc and len(doc) >= MIN_DOC_CHARS and doc.isascii():
            yield prefix, doc
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                if not child.name.startswith("_") or child.name == "__init__":
                    yield from walk(child, f"{prefix}.{child.name}")

    yield from walk(tree, module)


@lru_cache(maxsize=4)
def harvest(max_chars: int, root: Path | None = None) -> tuple[tuple[str, str], ...]:
    """(name, text): the pydoc topics, then distinct docstrings, until `max_chars` are collected.

    Cached: parsing the stdlib takes a second or two and several builders read it.
    """
    root = root or stdlib_root()
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    total = 0
    docstrings = (d for path in stdlib_files(root) for d in file_docstrings(path, root))
    for name, text in itertools.chain(pydoc_topics(root), docstrings):
        if text in seen:
            continue
        seen.add(text)
        out.append((name, text))
        total += len(text)
        if total >= max_chars:
            break
    return tuple(out)
