"""Errors the registry raises: each names the thing that is wrong and the fix.

Kept in an import-light module so the CLI can catch them without importing mlflow or prefect.
"""

from __future__ import annotations


class ArtifactNotFound(LookupError):
    """A ref (`sft@3`, `sft@latest`, `sft@<fingerprint-prefix>`, a path) resolves to nothing."""

    def __str__(self) -> str:  # LookupError quotes its message; show it plain
        return str(self.args[0]) if self.args else "artifact not found"


class DatasetError(RuntimeError):
    """A dataset a stage needs cannot be resolved to a pinned DVC version."""


class StageFailed(RuntimeError):
    """A stage function raised. The original exception is the `__cause__`.

    `transient` is True only for I/O-style failures (connection drops, timeouts, OS errors other
    than missing files / permissions) that a retry can fix; never for config errors or a NaN loss.
    """

    def __init__(self, stage: str, cause: BaseException):
        self.stage = stage
        self.transient = is_transient(cause)
        notes = "".join(f"\n  {n}" for n in getattr(cause, "__notes__", ()))
        super().__init__(f"stage {stage!r} failed: {type(cause).__name__}: {cause}{notes}")


_PERMANENT_OS_ERRORS = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
)


def is_transient(exc: BaseException) -> bool:
    """Whether a retry can plausibly fix `exc` (I/O hiccups yes; config, NaN, missing files no)."""
    if isinstance(exc, StageFailed):
        return exc.transient
    if isinstance(exc, _PERMANENT_OS_ERRORS):
        return False
    return isinstance(exc, (ConnectionError, TimeoutError, OSError))


class RegistryError(ValueError):
    """A model-registry request that cannot be served: an invalid model name or alias, an
    unregistered model, a missing version or alias, a stage the recipe does not promote."""


class PromotionRefused(RuntimeError):
    """A promotion gate failed (or its metric was never recorded); the alias did not move.

    `decision` is the recorded promotion.Decision (its evidence is also on the model version)."""

    def __init__(self, message: str, decision: object = None):
        super().__init__(message)
        self.decision = decision
