"""The MLflow model registry as references to store artifacts (no checkpoint copies).

A registered model per recipe (`promotion.model_name`, default the recipe name); a model version
per registered store artifact. A version's `source` is `runs:/<run-id>/moonforge_ref`: the stage
run that produced the artifact, where a small `reference.json` says which store artifact holds
the weights (an MLflow server accepts a runs:/ source; it refuses local paths outside the run's
artifact root). The version's tags carry stage, fingerprint, store path and every summary metric
(`moonforge.metric.<name>`), so gates are checked on what was recorded at registration.
Registering the same artifact twice returns the existing version (one version per fingerprint).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moonforge.registry.errors import RegistryError
from moonforge.registry.store import ArtifactInfo, ArtifactStore
from moonforge.stages.recipe import MODEL_NAME_RE

TAG = "moonforge."
METRIC_TAG = TAG + "metric."
REF_DIR = "moonforge_ref"
ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,62}$")
RESERVED_ALIAS_RE = re.compile(r"^(latest|v\d+)$", re.IGNORECASE)
"""MLflow reserves `latest` and `v<N>` (they read as version selectors in models:/ URIs)."""
MAX_TAG_VALUE = 5000


def validate_model_name(name: str) -> str:
    if not isinstance(name, str) or not MODEL_NAME_RE.match(name):
        raise RegistryError(
            f"invalid model name {name!r}: use letters, digits, '_', '.', '-' (starting with a "
            f"letter or digit, at most 128 chars), e.g. tiny or kimi-vl-a3b"
        )
    return name


def validate_alias(alias: str) -> str:
    if not isinstance(alias, str) or not ALIAS_RE.match(alias):
        raise RegistryError(
            f"invalid alias {alias!r}: an alias starts with a letter and holds letters, digits, "
            f"'_' or '-' (at most 63 chars), e.g. champion or candidate"
        )
    if RESERVED_ALIAS_RE.match(alias):
        raise RegistryError(
            f"invalid alias {alias!r}: MLflow reserves 'latest' and 'v<N>' as "
            f"version selectors; pick another name, e.g. champion"
        )
    return alias


def client_for(project: str | Path) -> Any:
    from mlflow import MlflowClient

    from moonforge.registry.tracking import tracking_uri

    return MlflowClient(tracking_uri(project))


def _error_code(e: Exception) -> str:
    return str(getattr(e, "error_code", ""))


def registered_models(client: Any) -> list[str]:
    return sorted(m.name for m in client.search_registered_models())


def _model_or_error(client: Any, name: str) -> Any:
    from mlflow.exceptions import MlflowException

    validate_model_name(name)
    try:
        return client.get_registered_model(name)
    except MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" not in _error_code(e) and "not found" not in str(e).lower():
            raise
    known = ", ".join(registered_models(client)) or "none yet"
    raise RegistryError(
        f"no registered model {name!r} in {client.tracking_uri} (registered: {known}); register "
        f"one with `moonforge promote <stage>@latest --alias candidate` or run the lifecycle"
    )


def get_version(client: Any, name: str, alias: str | None = None, version: int | None = None) -> Any:
    """The ModelVersion `name@alias` or `name/version`, or RegistryError naming what exists."""
    from mlflow.exceptions import MlflowException

    model = _model_or_error(client, name)
    aliases = dict(getattr(model, "aliases", {}) or {})
    if alias is not None:
        validate_alias(alias)
        if alias not in aliases:
            have = ", ".join(f"{a} -> v{v}" for a, v in sorted(aliases.items())) or "no aliases yet"
            raise RegistryError(
                f"model {name!r} has no alias {alias!r} ({have}); move it there with "
                f"`moonforge promote REF --alias {alias}`"
            )
        return client.get_model_version(name, str(aliases[alias]))
    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        have = ", ".join(str(v.version) for v in list_versions(client, name)) or "none"
        raise RegistryError(
            f"model {name!r} has no version {version} (versions: {have}); list them with `moonforge models`"
        ) from None


def list_versions(client: Any, name: str) -> list[Any]:
    """Every version of `name`, oldest first."""
    vs = client.search_model_versions(f"name = '{validate_model_name(name)}'")
    return sorted(vs, key=lambda v: int(v.version))


def find_version(client: Any, name: str, fingerprint: str) -> Any | None:
    """The version registered for this artifact fingerprint, if any."""
    return next(
        (v for v in list_versions(client, name) if (v.tags or {}).get(TAG + "fingerprint") == fingerprint),
        None,
    )


def recorded_metrics(mv: Any) -> dict[str, float]:
    """The summary metrics a version was registered with (from its moonforge.metric.* tags)."""
    out = {}
    for k, v in (mv.tags or {}).items():
        if k.startswith(METRIC_TAG):
            try:
                out[k[len(METRIC_TAG) :]] = float(v)
            except ValueError:
                continue
    return out


def _ensure_model(client: Any, name: str, recipe_name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(
            name,
            tags={TAG + "recipe": recipe_name},
            description=f"moonforge recipe {recipe_name}: stage outputs as versions (references "
            f"to the artifact store; no weights are copied into MLflow)",
        )
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in _error_code(e) and "already exists" not in str(e):
            raise


def _run_for(client: Any, info: ArtifactInfo, project: str | Path, recipe_name: str) -> str:
    """The stage run that produced `info` in this tracking backend, or a new registration run
    (an artifact built against another backend, or without tracking, has none here)."""
    from mlflow.exceptions import MlflowException

    run_id = info.lineage().get("mlflow_run_id")
    if run_id:
        try:
            client.get_run(run_id)
            return run_id
        except MlflowException:
            pass
    from moonforge.registry.tracking import Tracker

    exp = Tracker(project, recipe_name, uri=client.tracking_uri).experiment_id
    run = client.create_run(
        exp,
        run_name=f"register-{info.ref}",
        tags={
            TAG + "kind": "registration",
            TAG + "stage": info.stage,
            TAG + "fingerprint": info.fingerprint,
            TAG + "version": str(info.version),
            TAG + "artifact_path": info.uri,
        },
    )
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def register(
    client: Any, name: str, info: ArtifactInfo, store: ArtifactStore, project: str | Path, recipe_name: str
) -> Any:
    """The model version for store artifact `info` (created on first registration)."""
    validate_model_name(name)
    _ensure_model(client, name, recipe_name)
    existing = find_version(client, name, info.fingerprint)
    if existing is not None:
        return existing
    run_id = _run_for(client, info, project, recipe_name)
    lin = info.lineage()
    reference = {
        "stage": info.stage,
        "version": info.version,
        "ref": info.ref,
        "fingerprint": info.fingerprint,
        "store": store.where(),
        "path": info.uri,
        "note": "the checkpoint lives in the moonforge artifact store, not in MLflow",
    }
    client.log_text(run_id, json.dumps(reference, indent=2), f"{REF_DIR}/reference.json")
    tags = {
        TAG + "stage": info.stage,
        TAG + "kind": str(lin.get("kind") or info.stage),
        TAG + "fingerprint": info.fingerprint,
        TAG + "artifact_ref": info.ref,
        TAG + "artifact_path": info.uri,
        TAG + "store": store.where(),
        TAG + "recipe": recipe_name,
        TAG + "git_commit": str((lin.get("git") or {}).get("commit") or ""),
    }
    tags.update({METRIC_TAG + k: repr(float(v)) for k, v in (lin.get("metrics") or {}).items()})
    return client.create_model_version(
        name,
        source=f"runs:/{run_id}/{REF_DIR}",
        run_id=run_id,
        tags={k[:250]: str(v)[:MAX_TAG_VALUE] for k, v in tags.items()},
        description=f"{info.ref} (fingerprint {info.fingerprint[:12]}) in {store.where()}",
    )


@dataclass(frozen=True)
class VersionRow:
    """One line of `moonforge models`."""

    name: str
    version: int
    aliases: tuple[str, ...]
    artifact: str
    fingerprint: str
    metrics: dict[str, float]
    decisions: dict[str, str]


def version_rows(client: Any, name: str) -> list[VersionRow]:
    model = _model_or_error(client, name)
    by_version: dict[str, list[str]] = {}
    for alias, v in (getattr(model, "aliases", {}) or {}).items():
        by_version.setdefault(str(v), []).append(alias)
    rows = []
    for mv in list_versions(client, name):
        tags = mv.tags or {}
        rows.append(
            VersionRow(
                name,
                int(mv.version),
                tuple(sorted(by_version.get(str(mv.version), []))),
                tags.get(TAG + "artifact_ref", "?"),
                tags.get(TAG + "fingerprint", ""),
                recorded_metrics(mv),
                {k[len(TAG + "decision.") :]: v for k, v in tags.items() if k.startswith(TAG + "decision.")},
            )
        )
    return rows
