"""Recipes: both shipped recipes validate; bad input names the field and the fix."""

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from moonforge.stages.catalog import LIFECYCLE
from moonforge.stages.recipe import Recipe, RecipeError, load_recipe, recipe_to_yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
FULL = ROOT / "recipes" / "kimi-vl-a3b.yaml"


@pytest.mark.parametrize("path", [TINY, FULL])
def test_shipped_recipes_declare_all_nine_stages(path):
    r = load_recipe(path)
    kinds = [s.kind for s in r.stages]
    assert [k for k in kinds if k in LIFECYCLE] == list(LIFECYCLE)


def test_full_scale_budgets_match_the_paper():
    r = load_recipe(FULL)
    tokens = {s.kind: s.num_tokens for s in r.stages if s.kind in LIFECYCLE[:4]}
    lc = r.stage("long_context")
    tokens["long_context"] = sum(s.num_tokens for s in lc.sub_stages)
    assert tokens == {
        "vit_pretrain": 2.0e12,
        "align": 1.0e11,
        "joint_pretrain": 1.4e12,
        "cooldown": 6.0e11,
        "long_context": 3.0e11,
    }
    assert sum(tokens.values()) == pytest.approx(4.4e12)
    assert r.model.lm.rope_theta == 50000.0 and lc.rope_theta == 800000.0
    assert [lc.seq_len] + [s.seq_len for s in lc.sub_stages] == [8192, 32768, 131072]


def test_unknown_field_is_named_with_a_suggestion():
    with pytest.raises(RecipeError) as e:
        load_recipe(TINY, ["stages.cooldown.qa_rato=0.3"])
    assert "cooldown" in str(e.value) and "qa_rato" in str(e.value) and "qa_ratio" in str(e.value)


def test_unknown_model_field_is_named():
    with pytest.raises(RecipeError, match=r"model\.lm\.hiden_size.*hidden_size"):
        load_recipe(TINY, ["model.lm.hiden_size=3"])


def test_upstream_later_in_list_is_rejected():
    with pytest.raises(RecipeError, match="comes later in the list"):
        load_recipe(TINY, ["stages.align.upstream=cooldown"])


def test_upstream_missing_is_rejected():
    with pytest.raises(RecipeError, match="is not declared"):
        load_recipe(TINY, ["stages.align.upstream=nope"])


def test_align_may_not_train_the_lm():
    with pytest.raises(RecipeError, match="LM is frozen"):
        load_recipe(TINY, ["stages.align.trainable=[vision, projector, lm]"])


def test_budget_must_be_exactly_one(tmp_path):
    d = yaml.safe_load(TINY.read_text())
    d["stages"][1]["num_tokens"] = 1e6
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(RecipeError, match="exactly one of num_steps or num_tokens"):
        load_recipe(p)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("stages: [\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(p)


def test_override_of_unknown_stage_lists_stages():
    with pytest.raises(RecipeError, match="no stage named 'cooldwn'.*cooldown"):
        load_recipe(TINY, ["stages.cooldwn.qa_ratio=0.3"])


def test_base_inheritance_one_level(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {TINY}\nname: child\nstages:\n  - kind: cooldown\n    qa_ratio: 0.5\n")
    r = load_recipe(child)
    assert r.name == "child" and r.stage("cooldown").qa_ratio == 0.5
    assert r.stage("cooldown").num_steps == load_recipe(TINY).stage("cooldown").num_steps


@settings(max_examples=25, deadline=None)
@given(qa=st.floats(0, 1), lr=st.floats(1e-6, 1e-1), steps=st.integers(1, 10_000))
def test_yaml_round_trip(tmp_path_factory, qa, lr, steps):
    r = load_recipe(
        TINY,
        [
            f"stages.cooldown.qa_ratio={qa!r}",
            f"stages.cooldown.optimizer.lr={lr!r}",
            f"stages.cooldown.num_steps={steps}",
        ],
    )
    p = tmp_path_factory.mktemp("rt") / "r.yaml"
    p.write_text(recipe_to_yaml(r))
    assert load_recipe(p) == r
    assert Recipe.model_validate(yaml.safe_load(recipe_to_yaml(r))) == r


def test_override_does_not_leak_through_yaml_aliases(tmp_path):
    text = TINY.read_text().replace(
        "optimizer: {lr: 2.0e-3}\n    schedule: {kind: constant",
        "optimizer: &opt {lr: 2.0e-3}\n    schedule: {kind: constant",
        1,
    )
    text = text.replace(
        "optimizer: {lr: 2.0e-3}\n    schedule: {kind: cosine, warmup_steps: 5",
        "optimizer: *opt\n    schedule: {kind: cosine, warmup_steps: 5",
        1,
    )
    assert "*opt" in text and "&opt" in text
    p = tmp_path / "aliased.yaml"
    p.write_text(text)
    r = load_recipe(p, ["stages.joint_pretrain.optimizer.lr=0.5"])
    assert r.stage("joint_pretrain").optimizer.lr == 0.5
    assert r.stage("align").optimizer.lr == 2.0e-3
