"""Fingerprints: what makes two stage executions "the same", and why two differ.

fingerprint = sha256 of the canonical JSON of the *inputs* record:
    {"stage":    {"kind", "name"},
     "config":   the resolved stage config minus every `Runtime[...]` field (nested models too),
     "model":    the recipe's VLMConfig,
     "upstream": {"stage", "fingerprint"} or None,
     "data":     {dataset name: DVC md5 (or import:<fp> for an imported tokenizer)},
     "code":     digest of the code the stage runs (see `code_version`),
     "code_modules": {module: digest} behind "code", so a change names its modules,
     "init":     {part: {"stage", "fingerprint"}} of `init:` artifacts (only when set)}
The inputs record is stored in each artifact's manifest, so `explain_diff` can later say which
input changed (for `moonforge status`).

The code part covers only what a stage runs: its function's module and that module's import
closure inside the package, each hashed on its syntax tree with docstrings and comments dropped.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from moonforge.stages.config import RUNTIME


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


PACKAGE = "moonforge"
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
"""The directory that is the `moonforge` package (setuptools maps `moonforge` to the repo root)."""


@dataclass(frozen=True)
class CodeVersion:
    """The code a stage runs: one comparable digest plus the digest of every module behind it."""

    digest: str
    modules: dict[str, str]
    """Module name ("moonforge.stages.sft") -> digest of its syntax tree (12 hex chars)."""


def _module_file(module: str, root: Path) -> Path | None:
    parts = module.split(".")[1:]
    p = root.joinpath(*parts)
    if (p / "__init__.py").is_file():
        return p / "__init__.py"
    return p.with_suffix(".py") if parts and p.with_suffix(".py").is_file() else None


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]
    return tree


def _is_type_checking(node: ast.AST) -> TypeGuard[ast.If]:
    t = node.test if isinstance(node, ast.If) else None
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool, root: Path) -> set[str]:
    """Package modules `module` imports anywhere (function bodies too: lazy imports run as well),
    except under `if TYPE_CHECKING:`."""
    pkg = module if is_package else module.rpartition(".")[0]
    out: set[str] = set()
    todo = [tree]
    while todo:
        node = todo.pop()
        if _is_type_checking(node):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            if src.split(".")[0] != PACKAGE:
                continue
            for a in node.names:  # `from pkg import mod` imports a module, else a name of src
                sub = f"{src}.{a.name}"
                out.add(sub if _module_file(sub, root) is not None else src)
    return out


@functools.lru_cache(maxsize=4096)
def _parse(path: str, mtime_ns: int, size: int, module: str, root: str) -> tuple[str, frozenset[str]]:
    """(digest of the docstring-free syntax tree, package modules it imports) of one file."""
    tree = ast.parse(Path(path).read_text(), filename=path)
    deps = _imports(tree, module, path.endswith("__init__.py"), Path(root))
    text = ast.unparse(_strip_docstrings(tree))  # comments, blank lines, layout: gone
    return hashlib.sha256(text.encode()).hexdigest()[:12], frozenset(deps)


def _module_info(module: str, root: Path) -> tuple[str, frozenset[str]] | None:
    f = _module_file(module, root)
    if f is None:
        return None
    st = f.stat()
    return _parse(str(f), st.st_mtime_ns, st.st_size, module, str(root))


def import_closure(modules: Iterable[str], root: Path | None = None) -> dict[str, str]:
    """Module -> syntax-tree digest for `modules` and every package module they import, directly
    or not (parent packages included: importing a module runs its packages' __init__)."""
    root = Path(root) if root else PACKAGE_ROOT
    out: dict[str, str] = {}
    todo = list(modules)
    while todo:
        parts = todo.pop().split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name in out:
                continue
            info = _module_info(name, root)
            if info is None:
                continue
            out[name] = info[0]
            todo.extend(info[1])
    return dict(sorted(out.items()))


def stage_module(kind: str) -> str | None:
    """The module holding stage `kind`'s function (from the catalog; nothing is imported)."""
    from moonforge.stages import catalog

    ref = getattr(catalog, "_FUNCTIONS", {}).get(kind)
    return ref.split(":")[0] if ref else None


def code_version(kind: str | None = None, root: str | Path | None = None) -> CodeVersion:
    """See `_code_version`. For the installed package (root None) it is computed once per process
    and kind: the code this process runs is what it imported, whatever is edited on disk later."""
    if root is None:
        return _installed_code_version(kind)
    return _code_version(kind, Path(root))


@functools.cache
def _installed_code_version(kind: str | None) -> CodeVersion:
    return _code_version(kind, PACKAGE_ROOT)


def _code_version(kind: str | None, base: Path) -> CodeVersion:
    """The code version of stage `kind`: its function's module and that module's import closure
    inside the package, each hashed on its syntax tree without docstrings or comments.

    So a docstring, a comment, a reformat, the planner, a DVC builder or a CLI command change
    nothing; editing a module the stage imports (its loss, the loop, the model) changes it.
    Unknown kinds (or kind None) cover every module under model/ and stages/.
    """
    module = stage_module(kind) if kind else None
    if module is not None and _module_file(module, base) is not None:
        roots = [module]
    else:
        files = [
            p
            for d in ("model", "stages")
            for p in sorted((base / d).rglob("*.py"))
            if "__pycache__" not in p.parts
        ]
        roots = [
            f"{PACKAGE}." + ".".join(p.relative_to(base).with_suffix("").parts).removesuffix(".__init__")
            for p in files
        ]
    modules = import_closure(roots, base)
    digest = hashlib.sha256(canonical_json(modules).encode()).hexdigest()[:16]
    return CodeVersion(digest, modules)


def fingerprint_inputs(
    cfg: BaseModel,
    model: BaseModel,
    upstream: tuple[str, str] | None,
    data: Mapping[str, str],
    code: str | CodeVersion | None = None,
    init: Mapping[str, Mapping[str, str]] | None = None,
) -> dict:
    """The inputs record for one stage execution.

    `upstream` is (upstream stage name, its fingerprint) or None; `data` maps dataset name -> md5;
    `code` is the stage's CodeVersion (default: `code_version(cfg.kind)`) or a plain string;
    `init` maps part -> {"stage", "fingerprint"} of the recipe's `init:` artifacts (the key is
    present only when a stage has init, so stages without one keep their fingerprints).
    """
    kind = getattr(cfg, "kind", type(cfg).__name__)
    name = getattr(cfg, "stage_name", None) or kind
    extra: dict[str, Any] = {"init": {k: dict(v) for k, v in sorted(init.items())}} if init else {}
    if code is None:
        code = code_version(kind)
    if isinstance(code, CodeVersion):
        extra["code_modules"] = dict(code.modules)
        code = code.digest
    return {
        **extra,
        "stage": {"kind": kind, "name": name},
        "config": identity(cfg),
        "model": identity(model),
        "upstream": None if upstream is None else {"stage": upstream[0], "fingerprint": upstream[1]},
        "data": dict(sorted(data.items())),
        "code": code,
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


def explain_diff(
    old: Mapping[str, Any] | None,
    new: Mapping[str, Any],
    name_fp: Callable[[str, str], str | None] | None = None,
) -> list[str]:
    """Human reasons why two inputs records differ, e.g. ["config.optimizer.lr: 0.003 -> 0.001",
    "upstream lm_pretrain changed (fingerprint 1a2b3c4d -> 5e6f7a8b)", "data text: ab12 -> cd34",
    "code moonforge.stages.sft changed"]. Empty when they are identical.

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
                return (
                    name_fp(i["stage"], i["fingerprint"]) if name_fp else None
                ) or f"{i['stage']} fingerprint {i['fingerprint'][:8]}"

            out.append(f"init {part} changed ({name(a)} -> {name(b)})")
    if old.get("code") != new.get("code"):
        out += _code_diff(old, new)
    return out


def _code_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """ "code moonforge.stages.sft changed" per module when both records name their modules."""
    om, nm = old.get("code_modules"), new.get("code_modules")
    if not isinstance(om, Mapping) or not isinstance(nm, Mapping):
        return [f"code version changed ({old.get('code')} -> {new.get('code')})"]
    out = []
    for m in sorted(set(om) | set(nm)):
        if m not in om:
            out.append(f"code {m} added (now imported)")
        elif m not in nm:
            out.append(f"code {m} removed (no longer imported)")
        elif om[m] != nm[m]:
            out.append(f"code {m} changed")
    return out or [f"code version changed ({old.get('code')} -> {new.get('code')})"]
