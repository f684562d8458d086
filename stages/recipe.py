"""Recipes: one YAML file holding a whole lifecycle (model shape, datasets, ordered stages).

`load_recipe(path, overrides)` validates with pydantic (`extra="forbid"` everywhere) and turns
validation errors into `RecipeError`s that name the file, the field path and a fix. `--set` overrides
address stages by name: `stages.cooldown.qa_ratio=0.2`, `model.lm.rope_theta=1e5`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from moonforge.model.config import VLMConfig
from moonforge.stages.config import Frozen
from moonforge.stages.data.declared import DeclaredDataset, inject_declared
from moonforge.stages.stage_configs import (
    STAGE_CONFIGS,
    AlignConfig,
    CooldownConfig,
    JointPretrainConfig,
    LMPretrainConfig,
    Long2ShortConfig,
    LongContextConfig,
    LongCoTSFTConfig,
    RLConfig,
    SFTConfig,
    ViTPretrainConfig,
)

AnyStage = Annotated[
    LMPretrainConfig
    | ViTPretrainConfig
    | AlignConfig
    | JointPretrainConfig
    | CooldownConfig
    | LongContextConfig
    | SFTConfig
    | LongCoTSFTConfig
    | RLConfig
    | Long2ShortConfig,
    Field(discriminator="kind"),
]


class RecipeError(ValueError):
    """A recipe that cannot be used, with a message naming the field and the fix."""


MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
"""Registered-model names: safe in models:/ URIs, URLs and MLflow search filters."""
_GATE_RE = re.compile(
    r"^\s*(?P<metric>[A-Za-z0-9_][A-Za-z0-9_./-]*)\s*(?P<op>>=|<=|==|>|<)\s*"
    r"(?P<value>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$"
)
GATE_OPS = {">=": float.__ge__, "<=": float.__le__, ">": float.__gt__, "<": float.__lt__, "==": float.__eq__}


class Gate(Frozen):
    """One promotion rule on a recorded metric; written in YAML as "eval/acc >= 0.6"."""

    metric: str
    """A summary metric the promoted stage records (its lineage.json / MLflow run metrics)."""
    op: Literal[">=", "<=", ">", "<", "=="]
    value: float
    """The threshold."""

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, data: Any) -> Any:
        if not isinstance(data, str):
            return data
        m = _GATE_RE.match(data)
        if not m:
            raise ValueError(
                f"gate {data!r}: write it as '<metric> <op> <number>', e.g. 'eval/acc >= 0.6'; "
                f"op is one of {', '.join(GATE_OPS)}"
            )
        return {"metric": m["metric"], "op": m["op"], "value": float(m["value"])}

    def passes(self, value: float) -> bool:
        return GATE_OPS[self.op](float(value), self.value)

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.value:g}"


class PromotionConfig(Frozen):
    """How stage outputs become MLflow model versions and when an alias may move to one."""

    model_name: str | None = None
    """Registered-model name; default: the recipe name."""
    stages: tuple[str, ...] = ()
    """Stages whose artifacts may be registered / promoted; default: the recipe's last stage."""
    gates: tuple[Gate, ...] = ()
    """Every gate must pass on the version's recorded metrics before `moonforge promote` moves
    an alias; a metric the version never recorded fails its gate."""

    @model_validator(mode="after")
    def _check(self) -> PromotionConfig:
        if self.model_name is not None and not MODEL_NAME_RE.match(self.model_name):
            raise ValueError(
                f"promotion.model_name {self.model_name!r} is not a valid model name; use letters, "
                f"digits, '_', '.', '-' (starting with a letter or digit), e.g. tiny-vlm"
            )
        return self


class Recipe(Frozen):
    """A whole lifecycle: the model shape and the ordered stage list."""

    name: str
    """Recipe name: the MLflow experiment and registered-model name."""
    description: str = ""
    model: VLMConfig
    stages: tuple[AnyStage, ...]
    """Ordered stages; each upstream must name an earlier stage."""
    promotion: PromotionConfig = PromotionConfig()
    """Model registry: the model name, which stages it registers, and the promotion gates."""
    tokenizer: str | None = None
    """A ref to an imported checkpoint (`moonforge import`) whose tokenizer.json every stage uses
    in place of the DVC-built BPE (the `tokenizer` dataset); its fingerprint enters each stage's
    fingerprint as that dataset's version. None: train and use the BPE."""
    datasets: tuple[DeclaredDataset, ...] = ()
    """Users' own datasets (LLaVA / ShareGPT / messages / OpenAI conversations, WebDataset or
    Parquet image-text pairs, text, verl / messages+solution RL prompts, preference pairs), each
    tracked by DVC as data/<name>.dvc (`moonforge data add`); stages mix them in by name through
    their `mixture:` field. See stages/data/declared.py."""

    @model_validator(mode="before")
    @classmethod
    def _declared_into_stages(cls, data: Any) -> Any:
        return inject_declared(data)

    @model_validator(mode="after")
    def _graph(self) -> Recipe:
        names = [d.name for d in self.datasets]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"datasets: {dup} declared more than once; give each a distinct name")
        seen: list[str] = []
        for i, st in enumerate(self.stages):
            if st.stage_name in seen:
                raise ValueError(
                    f"stages[{i}]: duplicate stage name {st.stage_name!r}; give it a distinct `name:`"
                )
            if st.upstream is not None and st.upstream not in seen:
                later = [s.stage_name for s in self.stages[i + 1 :]]
                why = "comes later in the list" if st.upstream in later else "is not declared"
                raise ValueError(
                    f"stages[{i}] ({st.stage_name}): upstream {st.upstream!r} {why}; an upstream must "
                    f"be an earlier stage, one of {seen or '[none: this is the first stage]'}"
                )
            seen.append(st.stage_name)
        for name in self.promotion.stages:
            if name not in seen:
                raise ValueError(
                    f"promotion.stages: {name!r} is not a stage of this recipe; stages are: {', '.join(seen)}"
                )
        if self.promotion.model_name is None and not MODEL_NAME_RE.match(self.name):
            raise ValueError(
                f"recipe name {self.name!r} cannot double as the registered-model "
                f"name; set promotion.model_name (letters, digits, '_', '.', '-')"
            )
        return self

    @property
    def model_name(self) -> str:
        """The registered MLflow model this recipe's outputs become versions of."""
        return self.promotion.model_name or self.name

    def promoted_stages(self) -> tuple[str, ...]:
        """Stages whose artifacts may be registered (default: the last stage)."""
        return self.promotion.stages or ((self.stages[-1].stage_name,) if self.stages else ())

    def stage(self, name: str) -> Any:
        for st in self.stages:
            if st.stage_name == name:
                return st
        raise RecipeError(
            f"recipe {self.name!r} has no stage {name!r}; stages are: "
            + ", ".join(s.stage_name for s in self.stages)
        )

    def stage_names(self) -> list[str]:
        return [s.stage_name for s in self.stages]

    def downstream_of(self, name: str) -> list[str]:
        """Stages whose upstream chain passes through `name` (excluding it), in order."""
        tainted = {name}
        out = []
        for st in self.stages:
            if st.upstream in tainted:
                tainted.add(st.stage_name)
                out.append(st.stage_name)
        return out

    def digest(self) -> str:
        """Hash of the resolved recipe (recorded as a tag, not part of stage fingerprints)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _merge_stages(base: list, over: list) -> list:
    """Child stages override base stages with the same name; new names are appended."""
    by_name = {(s.get("name") or s.get("kind")): dict(s) for s in base}
    order = [(s.get("name") or s.get("kind")) for s in base]
    for s in over:
        key = s.get("name") or s.get("kind")
        if key in by_name:
            by_name[key] = _deep_merge(by_name[key], s)
        else:
            by_name[key] = dict(s)
            order.append(key)
    return [by_name[k] for k in order]


def _read_yaml(path: Path) -> dict:
    if not path.exists():
        raise RecipeError(f"recipe file {path} does not exist; pass a path like recipes/tiny.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML ({e}); fix the syntax at the line shown") from e
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping with model: and stages:")
    return data


def _parse_value(raw: str) -> Any:
    """`--set` values are YAML scalars/lists: 0.2, true, [vision, lm], 1e-5."""
    try:
        v = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(v, str):
        try:  # YAML 1.1 reads "1e-5" as a string; users mean a float
            return float(v)
        except ValueError:
            return v
    return v


def apply_override(data: dict, assignment: str) -> dict:
    """Apply one `a.b.c=value`; `stages.<name>.<field>` addresses a stage by name."""
    if "=" not in assignment:
        raise RecipeError(f"--set {assignment!r}: expected key=value, e.g. stages.cooldown.qa_ratio=0.2")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    value = _parse_value(raw)
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if part == "stages" and i == 0:
            stage_key = parts[1] if len(parts) > 2 else None
            if stage_key is None:
                raise RecipeError(f"--set {key}: name a stage and a field, e.g. stages.cooldown.qa_ratio=0.2")
            names = [(s.get("name") or s.get("kind")) for s in data.get("stages", [])]
            if stage_key not in names:
                raise RecipeError(
                    f"--set {key}: no stage named {stage_key!r}; stages are: {', '.join(names)}"
                )
            node = data["stages"][names.index(stage_key)]
            rest = parts[2:]
            for p in rest[:-1]:
                node = node.setdefault(p, {})
            node[rest[-1]] = value
            return data
        if not isinstance(node.get(part, {}), dict):
            raise RecipeError(f"--set {key}: {part!r} is not a section")
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return data


def _loc_name(data: dict, loc: tuple) -> str:
    parts = []
    for i, p in enumerate(loc):
        if i == 1 and loc[0] == "stages" and isinstance(p, int):
            try:
                st = data["stages"][p]
                parts.append(f"[{p}]({st.get('name') or st.get('kind')})")
                continue
            except (IndexError, KeyError, TypeError):
                pass
        if p in STAGE_CONFIGS:  # pydantic's discriminator level; not a user-visible key
            continue
        parts.append(f"[{p}]" if isinstance(p, int) else f".{p}")
    return "".join(parts).lstrip(".")


def _known_fields(data: dict, loc: tuple) -> list[str]:
    """Field names valid at the parent of `loc`, for did-you-mean hints."""
    model: Any = Recipe
    for p in loc[:-1]:
        if isinstance(p, int):
            continue
        if p in STAGE_CONFIGS:
            model = STAGE_CONFIGS[p]
            continue
        f = getattr(model, "model_fields", {}).get(p)
        if f is None:
            return []
        ann = f.annotation
        model = ann if hasattr(ann, "model_fields") else model
        if p == "stages":
            model = None
    return list(getattr(model, "model_fields", {}) or {})


def format_validation_error(err: ValidationError, data: dict, source: str) -> str:
    lines = [f"{source}: invalid recipe"]
    for e in err.errors():
        loc = tuple(e["loc"])
        where = _loc_name(data, loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            known = _known_fields(data, loc)
            hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
            fix = f"did you mean {hint[0]!r}?" if hint else "remove it (see the stage config's fields)"
            lines.append(f"  {where}: unknown field; {fix}")
        elif e["type"] == "missing":
            lines.append(f"  {where}: required field is missing; add it to the recipe")
        elif e["type"] == "value_error":  # our validators' messages already carry the fix
            lines.append(f"  {where}: {e['msg'].removeprefix('Value error, ')}")
        else:
            got = repr(e.get("input"))
            lines.append(f"  {where}: {e['msg']} (got {got[:80]})")
    return "\n".join(lines)


def load_recipe_dict(path: Path, overrides: tuple[str, ...] = ()) -> dict:
    """The raw (merged, overridden) recipe mapping, before validation."""
    path = Path(path)
    data = _read_yaml(path)
    if "base" in data:
        base_path = (path.parent / data.pop("base")).resolve()
        base = _read_yaml(base_path)
        if "base" in base:
            raise RecipeError(f"{base_path}: only one level of `base:` inheritance is allowed")
        stages = _merge_stages(base.get("stages", []), data.pop("stages", []))
        data = _deep_merge(base, data)
        data["stages"] = stages
    # YAML anchors/aliases share one mapping (deepcopy keeps that sharing); a JSON round trip
    # gives every stage its own copy, so an override touches only the stage it names.
    data = json.loads(json.dumps(data))
    for ov in overrides:
        data = apply_override(data, ov)
    return data


def load_recipe(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> Recipe:
    """Load and validate a recipe; raise RecipeError naming the bad field and the fix."""
    data = load_recipe_dict(Path(path), tuple(overrides))
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(format_validation_error(e, data, str(path))) from None


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML (written beside runs, logged to MLflow; round-trips)."""
    return yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=False), sort_keys=False)
