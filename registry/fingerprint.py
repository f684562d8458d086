"""Fingerprints: what makes two stage executions "the same", and why two differ.

fingerprint = sha256 of the canonical JSON of the *inputs* record:
    {"stage":    {"kind", "name"},
     "config":   the resolved stage config minus every `Runtime[...]` field (nested models too),
     "model":    the recipe's VLMConfig,
     "upstream": {"stage", "fingerprint"} or None,
     "data":     {dataset name: DVC md5 (or import:<fp> for an imported tokenizer)},
     "code":     hash of the moonforge model/ and stages/ .py sources,
     "init":     {part: {"stage", "fingerprint"}} of `init:` artifacts (only when set)}
The inputs record is stored in each artifact's manifest, so `explain_diff` can later say which
input changed (for `moonforge status`).
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Mapping

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from moonforge.stages.config import RUNTIME

CODE_DIRS = ("model", "stages")
"""Package folders whose .py sources make up the code version."""


def _is_runtime(field_info: Any) -> bool:
    return any(m is RUNTIME for m in getattr(field_info, "metadata", ()))


def identity(value: Any) -> Any:
    """JSON-able view of `value` with every Runtime[...] field of every nested model removed."""
    if isinstance(value, BaseModel):
        return {
            name: identity(getattr(value, name))
            for name, info in type(value).model_fields.items()
            if not _is_runtime(info)
        }
    if isinstance(value, (list, tuple)):
        return [identity(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): identity(v) for k, v in value.items()}
    return to_jsonable_python(value)


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


@functools.lru_cache(maxsize=None)
def code_version(root: str | None = None) -> str:
    """sha256 over (relative path, content) of every model/ and stages/ .py file.

    Computed once per process. Uncommitted edits count; docs, tests, flows and registry do not.
    """
    base = Path(root) if root else Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for d in CODE_DIRS:
        for p in sorted((base / d).rglob("*.py")):
            if "__pycache__" in p.parts:
                continue
            h.update(p.relative_to(base).as_posix().encode() + b"\0")
            h.update(p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def fingerprint_inputs(
    cfg: BaseModel,
    model: BaseModel,
    upstream: tuple[str, str] | None,
    data: Mapping[str, str],
    code: str | None = None,
    init: Mapping[str, Mapping[str, str]] | None = None,
) -> dict:
    """The inputs record for one stage execution.

    `upstream` is (upstream stage name, its fingerprint) or None; `data` maps dataset name -> md5;
    `init` maps part -> {"stage", "fingerprint"} of the recipe's `init:` artifacts (the key is
    present only when a stage has init, so stages without one keep their fingerprints).
    """
    kind = getattr(cfg, "kind", type(cfg).__name__)
    name = getattr(cfg, "stage_name", None) or kind
    extra = {"init": {k: dict(v) for k, v in sorted(init.items())}} if init else {}
    return {**extra,
        "stage": {"kind": kind, "name": name},
        "config": identity(cfg),
        "model": identity(model),
        "upstream": None if upstream is None else {"stage": upstream[0], "fingerprint": upstream[1]},
        "data": dict(sorted(data.items())),
        "code": code if code is not None else code_version(),
    }


def fingerprint(inputs: Mapping[str, Any]) -> str:
    """sha256 hex digest of the canonical JSON of an inputs record."""
    return hashlib.sha256(canonical_json(inputs).encode()).hexdigest()


def _short(v: Any) -> str:
    s = canonical_json(v) if not isinstance(v, str) else v
    return s if len(s) <= 40 else s[:37] + "..."


def _dict_diff(old: Any, new: Any, path: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            p = f"{path}.{k}" if path else str(k)
            if k not in old:
                out.append(f"{p}: added ({_short(new[k])})")
            elif k not in new:
                out.append(f"{p}: removed (was {_short(old[k])})")
            else:
                out.extend(_dict_diff(old[k], new[k], p))
        return out
    if old != new:
        return [f"{path}: {_short(old)} -> {_short(new)}"]
    return []


INPUT_KINDS = ("stage", "config", "model", "upstream", "data", "code", "init")
"""What can make a fingerprint differ; every explain_diff reason starts with one of these."""


def reason_kind(reason: str) -> str:
    """The input kind an explain_diff reason is about ("config", "upstream", "data", ...)."""
    head = reason.split(" ", 1)[0].split(".", 1)[0].rstrip(":")
    return head if head in INPUT_KINDS else "other"


def explain_diff(old: Mapping[str, Any] | None, new: Mapping[str, Any],
                 name_fp: Callable[[str, str], str | None] | None = None) -> list[str]:
    """Human reasons why two inputs records differ, e.g. ["config.optimizer.lr: 0.003 -> 0.001",
    "upstream lm_pretrain changed (fingerprint 1a2b3c4d -> 5e6f7a8b)", "data text: ab12 -> cd34",
    "code version changed"]. Empty when they are identical.

    `name_fp(stage, fingerprint)` may map an upstream fingerprint to a ref ("lm_pretrain@2"), so
    the upstream reason names versions: "upstream lm_pretrain changed (lm_pretrain@1 -> @2)"."""
    if not old:
        return ["no recorded inputs for the previous version"]
    out: list[str] = []
    out += _dict_diff(old.get("stage"), new.get("stage"), "stage")
    out += _dict_diff(old.get("config"), new.get("config"), "config")
    out += _dict_diff(old.get("model"), new.get("model"), "model")
    ou, nu = old.get("upstream"), new.get("upstream")
    if ou != nu:
        if ou is None or nu is None:
            out.append(f"upstream: {ou and ou['stage']} -> {nu and nu['stage']}")
        elif ou["stage"] != nu["stage"]:
            out.append(f"upstream stage: {ou['stage']} -> {nu['stage']}")
        else:
            a, b = ou["fingerprint"][:8], nu["fingerprint"][:8]
            if name_fp is None:
                out.append(f"upstream {nu['stage']} changed (fingerprint {a} -> {b})")
            else:
                a = name_fp(ou["stage"], ou["fingerprint"]) or f"fingerprint {a}"
                b = name_fp(nu["stage"], nu["fingerprint"]) or f"fingerprint {b}, not built yet"
                out.append(f"upstream {nu['stage']} changed ({a} -> {b})")
    od, nd = old.get("data") or {}, new.get("data") or {}
    for name in sorted(set(od) | set(nd)):
        if od.get(name) != nd.get(name):
            a = (od.get(name) or "none")[:8]
            b = (nd.get(name) or "none")[:8]
            out.append(f"data {name}: {a} -> {b}")
    oi, ni = old.get("init") or {}, new.get("init") or {}
    for part in sorted(set(oi) | set(ni)):
        a, b = oi.get(part), ni.get(part)
        if a != b:
            def name(i: Mapping[str, str] | None) -> str:
                if i is None:
                    return "none"
                return (name_fp(i["stage"], i["fingerprint"]) if name_fp else None) or \
                    f"{i['stage']} fingerprint {i['fingerprint'][:8]}"
            out.append(f"init {part} changed ({name(a)} -> {name(b)})")
    if old.get("code") != new.get("code"):
        out.append(f"code version changed ({old.get('code')} -> {new.get('code')})")
    return out
