"""Artifact refs in every form a user may type, resolved to one committed store artifact.

    sft@latest, sft@3, sft@<fingerprint-prefix>, sft     -> the store (ArtifactStore.resolve)
    /path/to/store/sft/3                                 -> the store (open_path)
    runs:/<mlflow-run-id>[/...]                          -> the stage run's fingerprint tag
    models:/<name>@<alias>, models:/<name>/<n>           -> the model version's fingerprint tag
    s3://bucket/prefix/sft/3                             -> the store (see `_from_s3`)

MLflow only ever holds references (run / model-version tags naming stage + fingerprint), so every
form ends in a store lookup by (stage, fingerprint): the store stays the one source of truth, and
a ref whose artifact was deleted or lives in another store fails with a clear error instead of
resolving to something else. mlflow is imported only for runs:/ and models:/ refs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moonforge.registry.errors import ArtifactNotFound
from moonforge.registry.store import ArtifactInfo, ArtifactStore

TAG = "moonforge."
_RUN_ID_RE = re.compile(r"^[0-9a-fA-F]{8,64}$")
_MODEL_REF_RE = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[^/@]+))$")


def _client(project: str | Path, client: Any = None) -> Any:
    if client is not None:
        return client
    from mlflow import MlflowClient

    from moonforge.registry.tracking import tracking_uri

    return MlflowClient(tracking_uri(project))


def _from_tags(store: ArtifactStore, tags: dict[str, str], what: str) -> ArtifactInfo:
    """The store artifact a run / model version points at (by stage + fingerprint, then path)."""
    stage, fp = tags.get(TAG + "stage"), tags.get(TAG + "fingerprint")
    if not stage or not fp:
        raise ArtifactNotFound(
            f"{what} carries no moonforge.stage / moonforge.fingerprint tags, so it is not a "
            f"moonforge stage output; pass a stage run or a registered moonforge model version"
        )
    hit = store.lookup(stage, fp)
    if hit is not None:
        return hit
    path = tags.get(TAG + "artifact_path")
    if path and Path(path).exists():
        try:
            info = store.open_path(Path(path))
        except ArtifactNotFound:
            info = None
        if info is not None and info.fingerprint == fp:
            return info
    raise ArtifactNotFound(
        f"{what} points at {stage} fingerprint {fp[:12]}, which is not in the store "
        f"{store.where()} (existing: {store.describe()}); set MOONFORGE_STORE to the store it was "
        f"built in, or rebuild it (moonforge run --until {stage})"
    )


def _from_run(ref: str, store: ArtifactStore, project: str | Path, client: Any) -> ArtifactInfo:
    run_id = ref[len("runs:/") :].strip("/").split("/")[0]
    if not _RUN_ID_RE.match(run_id):
        raise ArtifactNotFound(
            f"ref {ref!r}: expected runs:/<mlflow-run-id> (32 hex chars), "
            f"e.g. runs:/0123abcd...; got run id {run_id!r}"
        )
    from mlflow.exceptions import MlflowException

    c = _client(project, client)
    try:
        run = c.get_run(run_id)
    except MlflowException as e:
        raise ArtifactNotFound(
            f"ref {ref!r}: no MLflow run {run_id} in {c.tracking_uri} "
            f"({e.error_code}); copy the run id from the MLflow UI or "
            f"`moonforge lineage <stage>@latest`"
        ) from None
    tags = dict(run.data.tags)
    if tags.get(TAG + "kind") == "lifecycle":
        raise ArtifactNotFound(
            f"ref {ref!r} is a lifecycle (parent) run, which has no single artifact; use one of "
            f"its stage runs (child runs in the MLflow UI) or a stage@version ref"
        )
    if run.info.status != "FINISHED":
        raise ArtifactNotFound(
            f"ref {ref!r}: MLflow run {run_id} ({tags.get(TAG + 'stage', '?')}) is "
            f"{run.info.status}, so it committed no artifact; use a finished run"
        )
    return _from_tags(store, tags, f"MLflow run {run_id}")


def parse_model_ref(ref: str) -> tuple[str, str | None, int | None]:
    """`models:/name@alias` -> (name, alias, None); `models:/name/3` -> (name, None, 3)."""
    m = _MODEL_REF_RE.match(ref)
    if not m:
        raise ArtifactNotFound(
            f"ref {ref!r}: expected models:/<name>@<alias> (e.g. "
            f"models:/tiny@champion) or models:/<name>/<version> (e.g. models:/tiny/3)"
        )
    version = m["version"]
    if version is not None and not version.isdigit():
        raise ArtifactNotFound(
            f"ref {ref!r}: model version {version!r} is not a number; use "
            f"models:/{m['name']}/<n> or models:/{m['name']}@<alias>"
        )
    return m["name"], m["alias"], int(version) if version is not None else None


def _from_model(ref: str, store: ArtifactStore, project: str | Path, client: Any) -> ArtifactInfo:
    from moonforge.registry import model_registry

    name, alias, version = parse_model_ref(ref)
    mv = model_registry.get_version(_client(project, client), name, alias=alias, version=version)
    return _from_tags(store, dict(mv.tags), f"model version {name}/{mv.version}")


def _from_s3(ref: str, store: ArtifactStore, project: str | Path, client: Any) -> ArtifactInfo:
    # Hook for the S3 store: an S3 store's resolve() understands its own s3:// URIs; the local
    # store answers with its clear "not supported by this store" error.
    return store.resolve(ref)


RESOLVERS: dict[str, Callable[[str, ArtifactStore, Any, Any], ArtifactInfo]] = {
    "runs:/": _from_run,
    "models:/": _from_model,
    "s3://": _from_s3,
}


def resolve_ref(
    ref: str | Path, store: ArtifactStore, project: str | Path = ".", client: Any = None
) -> ArtifactInfo:
    """The committed artifact `ref` names (any form in the module docstring).

    Raises ArtifactNotFound naming the ref, what exists and how to fix it. `client`: an
    MlflowClient to use for runs:/ and models:/ (default: the project's tracking URI).
    """
    s = str(ref).strip()
    if not s:
        raise ArtifactNotFound(
            "empty ref: pass stage@latest, stage@N, runs:/<id>, models:/<name>@<alias> or an artifact path"
        )
    for prefix, fn in RESOLVERS.items():
        if s.startswith(prefix):
            return fn(s, store, project, client)
    return store.resolve(s)


def pinned(info: ArtifactInfo, store: ArtifactStore) -> str:
    """A ref that names exactly `info` from now on: `stage@N` when the store holds it, else its
    path (so `@latest`, prefixes and registry aliases cannot move under a running flow)."""
    return info.ref if store.lookup(info.stage, info.fingerprint) is not None else str(info.path)


def artifact_kind(info: ArtifactInfo) -> str:
    """The stage kind that produced `info` (an instance name may differ from its kind)."""
    stage = (info.inputs or {}).get("stage") or {}
    return stage.get("kind") or info.lineage().get("kind") or info.stage
