"""Property test over the whole recipe schema: a Runtime[...] field never changes a stage's
fingerprint; every other field of every stage config (nested models and tuples included) and of
the model config always does.

Fields are discovered by walking the pydantic schema of real configs (every stage of both shipped
recipes), so a field added later is covered without editing this file; a field this walk cannot
mutate into another valid value fails `test_every_field_has_a_valid_mutation` instead of being
skipped silently.
"""

from __future__ import annotations

import functools
import types
import typing
from pathlib import Path
from typing import Any, Literal

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from moonforge.registry.fingerprint import fingerprint, fingerprint_inputs
from moonforge.stages.config import RUNTIME
from moonforge.stages.recipe import Recipe, load_recipe
from moonforge.stages.stage_configs import STAGE_CONFIGS

REPO = Path(__file__).resolve().parent.parent
RECIPES = ("tiny.yaml", "kimi-vl-a3b.yaml")
SCHEMA_SELECTORS = {("kind",)}
"""`kind` picks the config class (the discriminator), so it is not a field *within* a schema;
that the stage kind/name count is checked in test_registry_fingerprint.test_every_other_input_counts."""
RECIPE_METADATA = {"name", "description", "promotion"}
"""Recipe-level fields that are not stage inputs (experiment name, prose, registry gates): they
never enter a stage fingerprint by design. Every other top-level field must be classified here."""
RESOLVED_REFS = {"tokenizer"}
"""Recipe-level refs to artifacts: the fingerprint of what they resolve to enters each stage's
fingerprint as its `tokenizer` data version (tested in tests/test_interop_recipe.py), the ref's
spelling does not."""
COPIED_INTO_STAGES = {"datasets"}
"""Recipe-level declarations of users' datasets: a stage that mixes one in gets a copy in its
own config (`declared`, an identity field walked below) and its DVC hash as a data version."""

FIXED_BY_VALIDATOR = {
    ("vit_pretrain", (0, "at_frac")),  # the first resolution milestone starts at 0.0
    ("long_context", ("num_steps",)),
    ("long_context", ("num_tokens",)),  # budget per sub-stage
    ("sft", ("num_steps",)),
    ("sft", ("num_tokens",)),  # budget per phase
} | {(kind, ("launcher", f)) for kind in STAGE_CONFIGS for f in ("nproc_per_node", "nnodes")}
# (launcher: an inprocess launcher is one process, so nproc_per_node / nnodes stay 1 alone)
"""(stage kind, path tail) leaves a cross-field validator pins to one value (None / 0.0):
nothing to vary, so nothing to prove; anything else without a valid mutation fails the test."""
Path_ = tuple  # a field path: ("optimizer", "lr"), ("resolution_schedule", 1, "at_frac")


@functools.cache
def recipes() -> tuple[Recipe, ...]:
    return tuple(load_recipe(REPO / "recipes" / r) for r in RECIPES)


def _is_runtime(info: Any) -> bool:
    return any(m is RUNTIME for m in getattr(info, "metadata", ()))


def _leaves(model: BaseModel, prefix: Path_ = (), runtime: bool = False):
    """(path, annotation, value, runtime) for every leaf field; tuples of models are walked per
    element and also yielded whole (so adding / dropping an element is a mutation too)."""
    for name, info in type(model).model_fields.items():
        path, rt = prefix + (name,), runtime or _is_runtime(info)
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            yield from _leaves(value, path, rt)
        elif isinstance(value, tuple) and value and all(isinstance(v, BaseModel) for v in value):
            yield path, info.annotation, value, rt
            for i, v in enumerate(value):
                yield from _leaves(v, path + (i,), rt)
        else:
            yield path, info.annotation, value, rt


def _flat_args(ann: Any) -> list[Any]:
    """The concrete types / literal values an annotation allows (Optional, Annotated unwrapped)."""
    origin = typing.get_origin(ann)
    if origin is typing.Annotated:
        return _flat_args(typing.get_args(ann)[0])
    if origin in (typing.Union, types.UnionType):
        return [a for arg in typing.get_args(ann) for a in _flat_args(arg)]
    return [ann]


def _literals(ann: Any) -> list[Any]:
    return [v for a in _flat_args(ann) if typing.get_origin(a) is Literal for v in typing.get_args(a)]


def _scalar_candidates(value: Any, ann: Any) -> list[Any]:
    lits = _literals(ann)
    if lits:
        return [v for v in lits if v != value]
    args = _flat_args(ann)
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value * 2, value - 1, 1, 2, 0]
    if isinstance(value, float):
        return [value * 1.5, value * 0.5, value + 0.1, value - 0.1, 0.5, 1.0, 0.0]
    if isinstance(value, str):
        return [value + "_x"]
    if value is None:
        out: list[Any] = []
        for a in args:
            if a is int or (isinstance(a, type) and issubclass(a, int)):
                out += [1, 2, 4, 0]  # 0: launcher.node_rank, which must stay below nnodes = 1
            elif a is float or (isinstance(a, type) and issubclass(a, float)):
                out += [0.5, 0.1, 2.0]
            elif a is str:
                out += ["x", "127.0.0.1:29400"]  # host:port: launcher.rdzv_endpoint
            elif typing.get_origin(a) is tuple:  # e.g. video.kinds: (motion,)
                out += [(c,) for c in _literals(typing.get_args(a)[0])]
            elif isinstance(a, type) and issubclass(a, BaseModel):  # e.g. init: {lm: x}
                out += [{name: "x"} for name in a.model_fields]
                out += [{name: 0.5} for name in a.model_fields]  # e.g. video: {share: 0.5}
        return out
    return []


def _declaration(kind: str) -> dict:
    """A users' dataset declaration of a format stage `kind` accepts (for `declared`/`mixture`)."""
    from moonforge.stages.data.declared import ACCEPTS

    return {"name": "user_set", "format": ACCEPTS[kind][0], "path": "a.jsonl"}


def candidates(value: Any, ann: Any) -> list[Any]:
    """Plausible other values for a leaf (validity is checked by the schema itself)."""
    if isinstance(value, dict):
        if str in typing.get_args(ann)[1:]:  # launcher.node_selector: Kubernetes node labels
            return [{"kubernetes.io/arch": "amd64"}] if not value else [{}]
        return [{"user_set": 0.5}] if not value else [{}]  # mixture: a declared set's share
    if isinstance(value, tuple):
        inner = [a for a in _flat_args(ann) if typing.get_origin(a) is tuple]
        elem_ann = typing.get_args(inner[0])[0] if inner else Any
        if not value and "format" in getattr(elem_ann, "model_fields", {}):  # declared
            return [(_declaration("sft"),)]
        out = [value[:-1]] if value else []
        out += [value + value[-1:]] if value else []
        out += [tuple(reversed(value))] if len(set(map(repr, value))) > 1 else []
        out += [value + (c,) for c in _literals(elem_ann) if c not in value]
        out += [(c,) for c in _literals(elem_ann) if (c,) != value]
        return out
    return _scalar_candidates(value, ann)


def _set(data: Any, path: Path_, value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(data, (list, tuple)):
        data = list(data)
        data[head] = _set(data[head], rest, value)
        return data
    return {**data, head: _set(data[head], rest, value)}


COUPLED: dict[Path_, Any] = {
    ("launcher", "context_parallel"): lambda v, data: {
        ("launcher", "kind"): "torchrun",
        ("launcher", "nproc_per_node"): v,
    },
    ("video",): lambda v, data: {("data",): [*data["data"], "videoworld"]},
} | {
    ("phases", i, "video"): lambda v, data: {
        ("video",): data["video"] or {"share": 0.5},
        ("data",): [*data["data"], "videoworld"],
    }
    for i in range(4)
}
"""Fields valid only with others set alike: a context-parallel degree needs as many ranks,
video needs the videoworld dataset, and an SFT phase's video the stage's video too."""


def mutate(cfg: BaseModel, path: Path_, value: Any) -> BaseModel | None:
    """`cfg` with the field at `path` set to `value`, or None when the schema rejects it."""
    data = cfg.model_dump()
    if path in COUPLED and value is not None:
        for other, v in COUPLED[path](value, data).items():
            data = _set(data, other, v)
    try:
        return type(cfg).model_validate(_set(data, path, value))
    except (ValidationError, ValueError, TypeError):
        return None


def fp(stage_cfg: BaseModel, model_cfg: BaseModel) -> str:
    return fingerprint(fingerprint_inputs(stage_cfg, model_cfg, ("up", "f" * 64), {"d": "a1"}, "c0"))


@functools.cache
def cases() -> tuple[tuple[int, str, Path_, bool], ...]:
    """(recipe index, "stage:<name>" | "model", path, runtime) for every leaf of every config."""
    out = []
    for ri, r in enumerate(recipes()):
        for st_cfg in r.stages:
            out += [
                (ri, f"stage:{st_cfg.stage_name}", p, rt)
                for p, _, _, rt in _leaves(st_cfg)
                if p not in SCHEMA_SELECTORS
            ]
        out += [(ri, "model", p, rt) for p, _, _, rt in _leaves(r.model)]
    return tuple(out)


def _target(ri: int, which: str) -> tuple[BaseModel, BaseModel]:
    """(the config being mutated, the recipe's model config)."""
    r = recipes()[ri]
    if which == "model":
        return r.model, r.model
    return r.stage(which.split(":", 1)[1]), r.model


def _leaf(cfg: BaseModel, path: Path_) -> tuple[Any, Any]:
    return next((ann, v) for p, ann, v, _ in _leaves(cfg) if p == path)


def _fingerprints(ri: int, which: str, base: BaseModel, changed: BaseModel) -> tuple[str, str]:
    _, model = _target(ri, which)
    if which == "model":
        stage = recipes()[ri].stages[-1]
        return fp(stage, base), fp(stage, changed)
    return fp(base, model), fp(changed, model)


def _first_change(base: BaseModel, path: Path_) -> BaseModel | None:
    ann, value = _leaf(base, path)
    return next(
        (c for c in (mutate(base, path, v) for v in candidates(value, ann)) if c is not None and c != base),
        None,
    )


@functools.cache
def base_for(case: tuple) -> BaseModel | None:
    """A valid config from which the leaf at `path` can move on its own.

    Usually the recipe's config itself. For one side of an exclusive pair (num_steps XOR
    num_tokens, warmup_steps XOR warmup_frac) first switch the pair over: set the leaf and clear
    its sibling; the property is then checked between two configs that differ only in the leaf.
    """
    ri, which, path, _ = case
    cfg, _ = _target(ri, which)
    if _first_change(cfg, path) is not None:
        return cfg
    if path == ("mixture",):  # a share needs a declaration of a format the stage accepts
        rebased = mutate(cfg, ("declared",), (_declaration(cfg.kind),))
        return rebased if rebased is not None and _first_change(rebased, path) is not None else None
    ann, value = _leaf(cfg, path)
    siblings = [p for p, _, v, _ in _leaves(cfg) if p[:-1] == path[:-1] and p != path and v]
    extra = []
    if path == ("num_tokens",):  # the same budget as tokens (RL needs whole steps per iteration)
        extra = [float(cfg.steps * cfg.batch_size * cfg.seq_len * k) for k in (1, 2)]
    for v in extra + candidates(value, ann):
        for sib in siblings:
            for reset in (None, 0):
                try:
                    data = _set(_set(cfg.model_dump(), path, v), sib, reset)
                    rebased = type(cfg).model_validate(data)
                except (ValidationError, ValueError, TypeError):
                    continue
                if _first_change(rebased, path) is not None:
                    return rebased
    return None


def test_recipe_top_level_fields_are_classified():
    assert set(Recipe.model_fields) == (
        {"model", "stages"} | RECIPE_METADATA | RESOLVED_REFS | COPIED_INTO_STAGES
    )


def test_the_walk_sees_the_runtime_fields_and_nested_identity_fields():
    paths = {(w, p) for _, w, p, rt in cases() if rt}
    # init is Runtime as written: its refs are resolved, and the artifacts' fingerprints enter
    # as the inputs record's `init` (tests/test_interop_recipe.py)
    assert {p for _, p in paths} == {
        ("log_every",),
        ("checkpoint_every",),
        ("num_workers",),
        ("activation_checkpointing",),
        ("compile",),
        ("init",),
    } | {
        ("launcher", f)
        for f in (
            "kind",
            "nproc_per_node",
            "nnodes",
            "node_rank",
            "rdzv_endpoint",
            "rdzv_timeout_s",
            "node_selector",
            "zero_stage",
            "backend",
            "context_parallel",
        )
    }
    ident = {p for _, _, p, rt in cases() if not rt}
    assert ("optimizer", "muon", "momentum") in ident and ("lm", "rope_theta") in ident
    assert ("resolution_schedule", 0, "max_patches") in ident and ("phases",) in ident


def test_every_field_has_a_valid_mutation_with_the_right_effect():
    """Exhaustive: each leaf of each config, mutated to its first valid other value."""
    unmutable, wrong = [], []
    for case in cases():
        ri, which, path, rt = case
        base = base_for(case)
        changed = None if base is None else _first_change(base, path)
        if changed is None:
            kind = getattr(_target(ri, which)[0], "kind", "model")
            if (kind, path[-2:]) not in FIXED_BY_VALIDATOR and (kind, path[-1:]) not in FIXED_BY_VALIDATOR:
                unmutable.append((RECIPES[ri], which, path))
            continue
        before, after = _fingerprints(ri, which, base, changed)
        if (before == after) != rt:
            wrong.append((RECIPES[ri], which, path, "runtime" if rt else "identity"))
    assert not wrong, f"fields whose fingerprint effect is wrong: {wrong}"
    assert not unmutable, f"no valid mutation found (extend candidates()): {unmutable}"


def _values(value: Any, ann: Any) -> st.SearchStrategy:
    fixed = candidates(value, ann)
    rand: list[st.SearchStrategy] = []
    if isinstance(value, bool):
        pass
    elif isinstance(value, int) or (value is None and int in _flat_args(ann)):
        rand.append(st.integers(0, 10**6))
    elif isinstance(value, float) or value is None:
        rand.append(st.floats(0.0, 1e6, allow_nan=False, allow_infinity=False))
    return st.one_of(*([st.sampled_from(fixed)] if fixed else []), *rand)


def _mutable_cases() -> list[tuple]:
    return [c for c in cases() if base_for(c) is not None]


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow]
)
@given(case=st.sampled_from(_mutable_cases()), data=st.data())
def test_runtime_fields_never_and_identity_fields_always_change_the_fingerprint(case, data):
    ri, which, path, rt = case
    base = base_for(case)
    ann, value = _leaf(base, path)
    new = data.draw(_values(value, ann), label=f"{which}.{'.'.join(map(str, path))}")
    changed = mutate(base, path, new)
    assume(changed is not None and changed != base)
    before, after = _fingerprints(ri, which, base, changed)
    if rt:
        assert before == after, f"Runtime field {path} changed the fingerprint"
    else:
        assert before != after, f"identity field {path} did not change the fingerprint"
