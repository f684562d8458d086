"""Inputs a stage takes from outside its upstream chain: the recipe's `init:` weights and an
imported tokenizer, resolved to store artifacts and to the fingerprint facts they contribute.

- `init:` refs resolve like any ref (`siglip@latest`, `moonlight@2`, `models:/...`, a path); the
  fingerprints of the artifacts they name enter the stage's fingerprint as `init`, so a new
  import makes the stage stale while rewriting `@latest` as `@3` does not.
- `recipe.tokenizer` names an imported checkpoint; its `tokenizer/` folder stands in for the
  `tokenizer` dataset, with `import:<fingerprint>` as that dataset's version.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moonforge.registry.errors import ArtifactNotFound
from moonforge.registry.store import ArtifactInfo, ArtifactStore
from moonforge.stages.artifacts import DatasetRef

TOKENIZER = "tokenizer"
TOKENIZER_DIR = "tokenizer"
UNRESOLVED = "unresolved:"
"""Fingerprint placeholder for an init / tokenizer ref the store cannot resolve yet (status)."""


def resolve_init(cfg: Any, store: ArtifactStore, project: str | Path) -> dict[str, ArtifactInfo]:
    """Part name -> the artifact the stage's `init:` names (ArtifactNotFound names the ref)."""
    from moonforge.registry.refs import resolve_ref

    init = getattr(cfg, "init", None)
    if init is None:
        return {}
    out = {}
    for part, ref in init.parts().items():
        try:
            out[part] = resolve_ref(ref, store, project)
        except ArtifactNotFound as e:
            raise ArtifactNotFound(
                f"stage {cfg.stage_name!r} init.{part}: {e} (import it first: moonforge import "
                f"HF_DIR --name {ref.split('@')[0]})"
            ) from e
    return out


def init_record(resolved: Mapping[str, ArtifactInfo]) -> dict[str, dict]:
    """The `init` entry of a fingerprint inputs record."""
    return {p: {"stage": a.stage, "fingerprint": a.fingerprint} for p, a in sorted(resolved.items())}


def expected_init(cfg: Any, store: ArtifactStore, project: str | Path) -> dict[str, dict]:
    """`init_record` for status / dry runs: an unresolvable ref becomes a placeholder, not an error."""
    init = getattr(cfg, "init", None)
    if init is None:
        return {}
    from moonforge.registry.refs import resolve_ref

    out = {}
    for part, ref in sorted(init.parts().items()):
        try:
            a = resolve_ref(ref, store, project)
            out[part] = {"stage": a.stage, "fingerprint": a.fingerprint}
        except ArtifactNotFound:
            out[part] = {"stage": ref.split("@")[0], "fingerprint": UNRESOLVED + ref}
    return out


def tokenizer_dataset(recipe: Any, store: ArtifactStore, project: str | Path) -> DatasetRef | None:
    """The imported tokenizer the recipe names, as the `tokenizer` dataset (None: use the BPE)."""
    ref = getattr(recipe, "tokenizer", None)
    if ref is None:
        return None
    from moonforge.registry.refs import resolve_ref

    info = resolve_ref(ref, store, project)
    folder = info.path / TOKENIZER_DIR
    if not (folder / "tokenizer.json").is_file():
        raise ArtifactNotFound(
            f"recipe tokenizer: {ref} resolves to {info.ref}, which holds no tokenizer/"
            "tokenizer.json; import a checkpoint directory that has a tokenizer.json, or drop "
            "`tokenizer:` to use the DVC-built BPE"
        )
    return DatasetRef(TOKENIZER, folder, f"import:{info.fingerprint}")


def expected_tokenizer_digest(recipe: Any, store: ArtifactStore, project: str | Path) -> str | None:
    """The `tokenizer` digest status / dry runs assume (None: the DVC lock's)."""
    ref = getattr(recipe, "tokenizer", None)
    if ref is None:
        return None
    try:
        d = tokenizer_dataset(recipe, store, project)
    except ArtifactNotFound:
        return UNRESOLVED + ref
    return d.digest if d is not None else None
