"""The code part of a fingerprint is the code a stage runs, and nothing else.

A stage's code version covers its function's module and that module's import closure inside the
package, hashed on the syntax tree without docstrings or comments. Checked both ways on a copy of
the package: docstrings, comments, layout, the planner, a DVC builder and a CLI command change no
stage; a one-line edit of the SFT loss changes sft (and long_cot_sft, which imports it) only; and
`moonforge status`, run from the edited copy, says so, naming the module. Wall time ~15 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from frozen_code import package_copy

from moonforge.registry.fingerprint import code_version, explain_diff, fingerprint_inputs
from moonforge.stages.catalog import LIFECYCLE

REPO = Path(__file__).resolve().parent.parent
KINDS = ("lm_pretrain",) + LIFECYCLE
LOSS_LINE = '    metrics["supervised_frac"] = batch.num_targets / max(batch.num_tokens, 1)\n'


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} not found exactly once in {path}"
    path.write_text(text.replace(old, new))


def cosmetic_edits(root: Path) -> None:
    """Docstrings, comments and layout under stages/, plus real edits outside any stage's code."""
    edit(root / "stages" / "sft.py", '"""Masked next-token CE', '"""Masked (reworded) next-token CE')
    edit(root / "stages" / "sft.py", LOSS_LINE, "    # a comment\n\n" + LOSS_LINE)
    loop = root / "stages" / "train" / "loop.py"
    loop.write_text('"""A new module docstring."""\n' + loop.read_text().split('"""', 2)[2])
    lm = root / "model" / "lm.py"
    lm.write_text(lm.read_text().replace("\n\n", "\n\n\n").replace(", ", " , "))  # layout only
    for rel in ("stages/plan.py", "stages/data/build.py", "flows/cli.py"):  # planner, DVC, CLI
        with (root / rel).open("a") as f:
            f.write("\n\ndef _added_by_a_test():\n    return 42\n")


def test_docstrings_layout_planner_builder_and_cli_change_no_stage(tmp_path):
    root = package_copy(tmp_path)
    before = {k: code_version(k, root) for k in KINDS}
    assert before == {k: code_version(k, REPO) for k in KINDS}  # the copy is the checkout's code
    assert not any(
        "plan" in m or "data.build" in m or "flows" in m for v in before.values() for m in v.modules
    )
    cosmetic_edits(root)
    assert {k: code_version(k, root) for k in KINDS} == before


def test_a_one_line_loss_edit_changes_only_the_stages_that_run_it(tmp_path):
    from moonforge.model.config import VLMConfig
    from moonforge.stages.recipe import load_recipe

    root = package_copy(tmp_path)
    before = {k: code_version(k, root) for k in KINDS}
    edit(
        root / "stages" / "sft.py",
        LOSS_LINE,
        LOSS_LINE.replace("max(batch.num_tokens, 1)", "max(batch.num_tokens, 2)"),
    )
    after = {k: code_version(k, root) for k in KINDS}
    assert {k for k in KINDS if after[k] != before[k]} == {"sft", "long_cot_sft"}
    cfg = load_recipe(REPO / "recipes" / "tiny.yaml").stage("sft")
    old = fingerprint_inputs(cfg, VLMConfig(), None, {}, before["sft"])
    new = fingerprint_inputs(cfg, VLMConfig(), None, {}, after["sft"])
    assert explain_diff(old, new) == ["code moonforge.stages.sft changed"]
    assert old["code"] != new["code"] and old["code_modules"]["moonforge.stages.sft"]


BUILD = """
import sys
from pathlib import Path
import moonforge
from moonforge.registry.run_stage import expected_chain
from moonforge.registry.store import open_store
from moonforge.stages.recipe import load_recipe
assert Path(moonforge.__file__).parent == Path(sys.argv[1]), moonforge.__file__
store = open_store(".")
for name, (inputs, fp) in expected_chain(load_recipe("recipes/tiny.yaml"), ".").items():
    staging = store.begin(name)
    (staging / "model.safetensors").write_bytes(b"w")
    store.commit(staging, fp, inputs)
"""


def test_moonforge_status_names_the_changed_module(tmp_project, tmp_path):
    root = package_copy(tmp_path / "pkg")
    env = {**os.environ, "PYTHONPATH": str(root.parent), "PYTHONDONTWRITEBYTECODE": "1"}
    run = dict(cwd=tmp_project, env=env, capture_output=True, text=True)
    res = subprocess.run([sys.executable, "-c", BUILD, str(root)], **run)
    assert res.returncode == 0, res.stderr
    status = [sys.executable, "-m", "moonforge.flows.cli", "status", "--format", "json"]

    def states() -> dict[str, dict]:
        res = subprocess.run(status, **run)
        assert res.returncode == 0, res.stderr
        return {r["stage"]: r for r in json.loads(res.stdout)}

    cosmetic_edits(root)
    assert {s: r["state"] for s, r in states().items()} == {k: "fresh" for k in KINDS}

    edit(root / "stages" / "sft.py", LOSS_LINE, LOSS_LINE.replace("max(", "1.0 * max("))
    rows = states()
    stale = ["sft", "long_cot_sft", "rl", "long2short"]
    assert {s for s, r in rows.items() if r["state"] == "stale"} == set(stale)
    assert rows["sft"]["reasons"] == ["code moonforge.stages.sft changed"], rows["sft"]
    assert rows["sft"]["changed"] == ["code"]
    assert "code moonforge.stages.sft changed" in rows["long_cot_sft"]["reasons"]
    assert any(r.startswith("upstream long_cot_sft changed") for r in rows["rl"]["reasons"])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
