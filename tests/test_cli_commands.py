"""The Typer CLI through CliRunner: errors name the field / ref, run -> status -> lineage -> rerun."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from moonforge.flows import cli
from moonforge.stages import catalog
from moonforge.stages.catalog import StageNotAvailable

pytestmark = pytest.mark.usefixtures("wide_consoles")

runner = CliRunner()
MINI = "recipes/mini.yaml"


def invoke(*args):
    return runner.invoke(cli.app, list(args))


def test_help_is_fast_and_imports_nothing_heavy():
    code = (
        "import sys, moonforge.flows.cli as c; "
        "print(sorted(m for m in ('torch', 'mlflow', 'prefect', 'dvc') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    res = invoke("--help")
    assert res.exit_code == 0
    for cmd in ("run", "rerun", "status", "lineage", "data"):
        assert cmd in res.output


def test_bad_recipe_field_exits_nonzero_and_names_the_field(tmp_project):
    res = invoke("run", MINI, "--set", "stages.lm_pretrain.num_stepz=3")
    assert res.exit_code == 1
    assert (
        "recipe error" in res.output and "num_stepz: unknown field; did you mean 'num_steps'?" in res.output
    )
    assert "Traceback" not in res.output
    res = invoke("status", "recipes/nope.yaml")
    assert res.exit_code == 1 and "recipes/nope.yaml does not exist" in res.output
    res = invoke("run", MINI, "--until", "sft")
    assert res.exit_code == 1 and "--until 'sft': no such stage" in res.output


def test_from_a_missing_ref_names_it(tmp_project):
    res = invoke("rerun", "vit_pretrain", "--recipe", MINI, "--from", "lm_pretrain@9")
    assert res.exit_code == 1
    assert "artifact not found" in res.output and "'lm_pretrain@9'" in res.output
    assert "moonforge run --until lm_pretrain" in res.output
    res = invoke("rerun", "vit_pretrain", "--recipe", MINI)
    assert res.exit_code == 1 and "needs an artifact of its upstream 'lm_pretrain'" in res.output
    res = invoke("lineage", "align@abc12")
    assert res.exit_code == 1 and "'align@abc12'" in res.output


def test_run_status_lineage_rerun(tmp_project, fake_stages, prefect_api):
    res = invoke("run", MINI)
    assert res.exit_code == 0, res.output
    for ref in ("lm_pretrain@1", "vit_pretrain@1", "align@1"):
        assert ref in res.output
    assert "mlflow ui --backend-store-uri sqlite:///.moonforge/mlflow.db" in res.output
    assert "moonforge lineage align@1" in res.output and "eval/acc" in res.output

    res = invoke("status", MINI)
    assert res.exit_code == 0 and res.output.count("fresh") == 3

    res = invoke("status", MINI, "--set", "stages.lm_pretrain.seed=3")
    assert res.exit_code == 0
    assert "config.seed: 0 -> 3" in res.output and "upstream lm_pretrain changed" in res.output
    assert res.output.count("stale") == 3

    res = invoke("lineage", "align@latest", "--format", "json")
    chain = json.loads(res.output)
    assert [c["ref"] for c in chain] == ["align@1", "vit_pretrain@1", "lm_pretrain@1"]
    res = invoke("lineage", "align@1", "--format", "mermaid")
    assert res.output.startswith("graph LR") and "vit_pretrain_1 --> align_1" in res.output
    res = invoke("lineage", "align@1")
    assert "data toyworld" in res.output and "lm_pretrain@1" in res.output

    res = invoke(
        "rerun",
        "vit_pretrain",
        "--recipe",
        MINI,
        "--set",
        "stages.vit_pretrain.seed=2",
        "--from",
        "lm_pretrain@latest",
        "--downstream",
    )
    assert res.exit_code == 0, res.output
    assert "vit_pretrain@2" in res.output and "align@2" in res.output

    fake_stages.fail["align"] = [FloatingPointError("loss is nan")]
    res = invoke("rerun", "align", "--recipe", MINI, "--set", "stages.align.seed=9")
    assert res.exit_code == 1
    assert "stage 'align' failed: FloatingPointError: loss is nan" in res.output
    assert "Traceback" not in res.output and fake_stages.calls.count("align") == 3


def test_unavailable_stage_is_a_clear_error(tmp_project, prefect_api, monkeypatch):
    def missing(kind):
        raise StageNotAvailable(f"stage {kind!r} is declared but not implemented in this version")

    monkeypatch.setattr(catalog, "stage_function", missing)
    res = invoke("run", MINI)
    assert res.exit_code == 1
    assert "stage not available: stage 'lm_pretrain' is declared but not implemented" in res.output


def test_data_status_and_build(tmp_project):
    res = invoke("data", "status")
    assert res.exit_code == 0 and "text" in res.output and "up to date" in res.output
    (tmp_project / "params.yaml").write_text("text_repeat: 2\ntoy_items: 4\n")
    res = invoke("data", "status")
    assert any(line.split()[:2] == ["text", "changed"] for line in res.output.splitlines())
    res = invoke("data", "build", "text")
    assert res.exit_code == 0 and "Running stage 'text'" in res.output
    assert "changed" not in invoke("data", "status").output


@pytest.mark.parametrize("error", ["stage", "other"])
def test_error_text_with_brackets_prints_verbatim(error, monkeypatch):
    """A launcher's output quotes gloo's `[/__w/pytorch/.../pair.cc:553]`: printed through rich
    markup it raised MarkupError and hid the real error."""
    import io

    from rich.console import Console

    from moonforge.registry.errors import StageFailed

    buf = io.StringIO()
    monkeypatch.setattr(cli, "err_console", Console(file=buf, width=200))
    msg = "rank 1: [/__w/pytorch/third_party/gloo/pair.cc:553] Connection closed by peer [bold]"
    exc = StageFailed("vit_pretrain", RuntimeError(msg)) if error == "stage" else RuntimeError(msg)
    with pytest.raises(cli.typer.Exit):
        with cli._errors():
            raise exc
    assert msg in buf.getvalue()
