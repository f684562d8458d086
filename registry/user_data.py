"""`moonforge data add`: put a user's dataset under DVC and declare it in a recipe.

Local data ends up in `data/<name>/` (copied there unless it already is, since DVC versions files
of the workspace) and is tracked with `dvc add data/<name>` as `data/<name>.dvc`; an `s3://` path
is tracked without copying, `dvc import-url --no-download <prefix> data/<name>`, and streamed from
S3 by the readers. The declaration (format, path relative to data/<name>/ or the S3 URI,
images_root, held-out count) is appended to the recipe's `datasets:` section as text, so the
recipe's comments and layout stay as they were. Nothing is half done: the files are indexed with
the declared format before anything is tracked, and a failure undoes the copy.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from moonforge.registry.data_versions import declared_file, dvc
from moonforge.registry.errors import DatasetError
from moonforge.stages.data.declared import DeclaredDataset
from moonforge.stages.data.user_files import GLOB_CHARS, DatasetFormatError
from moonforge.stages.recipe import RecipeError, load_recipe


def _static_prefix(pattern: str) -> tuple[str, str]:
    """(directory without glob characters, the rest) of a path or glob."""
    cut = min((pattern.find(c) for c in GLOB_CHARS if c in pattern), default=-1)
    if cut < 0:
        return pattern, ""
    head = pattern[:cut].rsplit("/", 1)[0] if "/" in pattern[:cut] else "."
    return head, pattern[len(head) :].lstrip("/")


def _copy_in(src: Path, target: Path) -> str:
    """Copy a file or directory into `target` (unless it is inside already); its path there."""
    src = src.resolve()
    if src.is_relative_to(target):
        return str(src.relative_to(target)) or "."
    if target.is_relative_to(src):
        raise DatasetError(f"{src} holds the project itself; point at the dataset's own file or folder")
    if not src.exists():
        raise DatasetError(f"{src}: no such file or directory")
    dest = target / src.name
    if dest.exists():
        raise DatasetError(f"{dest} exists already; remove it or add the data under another name")
    target.mkdir(parents=True, exist_ok=True)
    (shutil.copytree if src.is_dir() else shutil.copy2)(src, dest)
    return src.name


def declaration_for(
    name: str, path: str, fmt: str, images_root: str | None, heldout: int, project: Path
) -> dict[str, Any]:
    """The declaration `data add` writes (paths made relative to data/<name>/ after copying)."""
    target = project / "data" / name
    decl: dict[str, Any] = {"name": name, "format": fmt}
    if path.startswith("s3://"):
        if images_root and not images_root.startswith("s3://"):
            raise DatasetError(
                "an s3:// dataset streams from S3, so its --images-root must be an s3:// URI too"
            )
        decl["path"] = path
        if images_root:
            decl["images_root"] = images_root
    else:
        head, rest = _static_prefix(path)
        if rest and Path(head).resolve() == project:
            raise DatasetError(
                f"{path}: give the glob a directory of its own (e.g. shards/*.tar); "
                "it would copy the whole project into data/"
            )
        base = _copy_in(Path(head), target)
        decl["path"] = f"{base}/{rest}" if rest else base
        if images_root:
            decl["images_root"] = _copy_in(Path(images_root), target)
    if heldout:
        decl["num_heldout"] = heldout
    _validated(decl)
    return decl


def _validated(decl: dict[str, Any]) -> DeclaredDataset:
    """The declaration, or a DatasetError with pydantic's messages as one line each."""
    from pydantic import ValidationError

    try:
        return DeclaredDataset.model_validate(decl)
    except ValidationError as e:
        why = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'declaration'}: {err['msg'].removeprefix('Value error, ')}"
            for err in e.errors()
        )
        raise DatasetError(f"dataset {decl.get('name')!r}: {why}") from None


def declare_in_recipe(recipe_path: Path, decl: dict[str, Any]) -> None:
    """Append `decl` to the recipe's top-level `datasets:` list (created at the end if absent),
    editing the text so comments survive; the recipe must still load, else it is left as it was."""
    text = recipe_path.read_text()
    raw = yaml.safe_load(text) or {}
    if any(isinstance(d, dict) and d.get("name") == decl["name"] for d in raw.get("datasets") or []):
        raise DatasetError(
            f"{recipe_path} already declares a dataset {decl['name']!r}; remove it "
            "from the recipe's datasets: first, or pick another name"
        )
    entry = "".join(
        "  " + line for line in yaml.safe_dump([decl], sort_keys=False, width=100).splitlines(keepends=True)
    )
    lines = text.splitlines(keepends=True)
    top = re.compile(r"^datasets:\s*(\[\s*\])?\s*(#.*)?$")
    start = next((i for i, ln in enumerate(lines) if top.match(ln)), None)
    if start is None:
        new = (
            text.rstrip("\n") + "\n\n# Users' own data (`moonforge data add`); stages mix them "
            "in with mixture:\ndatasets:\n" + entry
        )
    else:
        lines[start] = "datasets:\n"
        end = start + 1
        while end < len(lines) and (not lines[end].strip() or lines[end][0] in " -"):
            end += 1
        while end > start + 1 and not lines[end - 1].strip():
            end -= 1
        new = "".join(lines[:end] + [entry] + lines[end:])
    recipe_path.write_text(new)
    try:
        load_recipe(recipe_path)
    except RecipeError:
        recipe_path.write_text(text)
        raise


def _refuse_unreadable(ds) -> None:
    """If no record of the first block reads as the declared format, the format or the column
    mapping is wrong: say so now rather than at training time."""
    from moonforge.stages.data.user_images import BadRecord

    first = [ds.record(i) for i in range(min(ds.block, len(ds)))]
    if first and all(isinstance(r, BadRecord) for r in first):
        raise DatasetError(
            f"none of the first {len(first)} records of {ds.pattern} reads as format "
            f"{ds.decl.format!r}; e.g. {first[0]}. Pick the right --format, or add "
            "the dataset and map its columns / tags in the recipe's declaration"
        )


def add_dataset(
    project: str | Path,
    name: str,
    path: str,
    fmt: str,
    images_root: str | None,
    recipe_path: str | Path,
    heldout: int = 0,
) -> dict[str, Any]:
    """Track a user's dataset with DVC and declare it in the recipe; returns the declaration."""
    from moonforge.stages.data.user_sets import DeclaredSet

    root = Path(project).resolve()
    recipe_path = Path(recipe_path)
    _validated({"name": name, "format": fmt, "path": "x"})  # name, format
    raw = yaml.safe_load(recipe_path.read_text()) or {}
    if any(isinstance(d, dict) and d.get("name") == name for d in raw.get("datasets") or []):
        raise DatasetError(f"{recipe_path} already declares a dataset {name!r}; pick another name")
    if declared_file(root, name).exists():
        raise DatasetError(
            f"data/{name}.dvc exists already; pick another name (or `dvc remove "
            f"data/{name}.dvc` and delete data/{name} first)"
        )
    target = root / "data" / name
    created = not target.exists()
    try:
        decl = declaration_for(name, path, fmt, images_root, heldout, root)
        ds = DeclaredSet(_validated(decl), target)  # reads as the format says
        _refuse_unreadable(ds)
        if path.startswith("s3://"):
            prefix, _ = _static_prefix(path)
            dvc(root, "import-url", "--no-download", prefix, f"data/{name}")
        else:
            dvc(root, "add", f"data/{name}")
    except (DatasetFormatError, ValueError, DatasetError):
        if created:
            shutil.rmtree(target, ignore_errors=True)
        raise
    declare_in_recipe(recipe_path, decl)
    decl["records"] = ds.num_records
    return decl


def open_declared(project: str | Path, recipe_path: str | Path, name: str):
    """(DeclaredSet, tokenizer or None, VisionSpec) of a dataset the recipe declares, for
    `data check` / `data show`; the tokenizer is the recipe's (imported) or the DVC-built BPE."""
    from moonforge.registry.data_versions import read_lock
    from moonforge.stages.data.sources import VisionSpec
    from moonforge.stages.data.user_sets import DeclaredSet

    root = Path(project).resolve()
    recipe = load_recipe(recipe_path)
    decl = next((d for d in recipe.datasets if d.name == name), None)
    if decl is None:
        raise DatasetError(
            f"recipe {recipe.name!r} ({recipe_path}) declares no dataset {name!r} "
            f"(declared: {', '.join(d.name for d in recipe.datasets) or 'none'}); "
            f"add it with `moonforge data add {name} PATH --format F`"
        )
    vision = VisionSpec.of(recipe.model.vision)
    tok = None
    try:
        if recipe.tokenizer is not None:
            from moonforge.registry.stage_inputs import tokenizer_dataset
            from moonforge.registry.store import open_store

            tok_ds = tokenizer_dataset(recipe, open_store(root), root)
            assert tok_ds is not None  # None only when the recipe names no tokenizer
            tok_dir = tok_ds.path
        else:
            tok_dir = read_lock(root, ["tokenizer"])["tokenizer"].path
        from moonforge.model.tokenizer import Tokenizer

        tok = Tokenizer.load(tok_dir)
    except (DatasetError, FileNotFoundError):
        pass  # no tokenizer built yet: the check skips token lengths
    return DeclaredSet(decl, root / "data" / name), tok, vision
