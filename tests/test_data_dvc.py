"""The real `dvc` CLI over the repository's dvc.yaml: a fresh project builds every dataset and
writes dvc.lock, a rerun is a no-op, and a second fresh copy reproduces identical hashes."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_data_helpers import TINY_PARAMS, write_params
from test_data_post_helpers import POST_DATASETS, POST_TINY_PARAMS

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc") if (BIN / "dvc").exists() else (shutil.which("dvc") or "dvc")
DATASETS = ("toyworld", "videoworld", "text", "longdoc", "tokenizer", *POST_DATASETS)
DVC_PARAMS = {
    **TINY_PARAMS,
    **POST_TINY_PARAMS,
    "toyworld": {"seed": 0, "num_train": 60, "num_val": 8},
    "tokenizer": {"vocab_size": 400, "min_frequency": 2},
}
"""Even smaller than TINY_PARAMS: this test builds everything twice through dvc."""


def _dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    # dvc.yaml calls `python`: put this interpreter's venv first so that is the one it gets.
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run([DVC, *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _project(root: Path) -> Path:
    """A minimal git + DVC project: dvc.yaml, tiny params and the code files its stages depend on.

    The commands run the installed moonforge package; the copied files are what DVC hashes.
    """
    root.mkdir()
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    write_params(root / "params.yaml", DVC_PARAMS)
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for dep in {d for s in stages.values() for d in s.get("deps", []) if not d.startswith("data/")}:
        (root / dep).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / dep, root / dep)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)  # dvc writes data/.gitignore
    _dvc(root, "init", "-q")
    with open(root / ".dvc" / "config", "a") as f:
        f.write("[core]\n    analytics = false\n")
    return root


def _out_hashes(root: Path) -> dict[str, str]:
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return {name: stage["outs"][0]["md5"] for name, stage in lock["stages"].items()}


def test_dvc_yaml_declares_every_dataset_as_a_stage():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert set(DATASETS) <= set(stages)
    for name in DATASETS:
        assert stages[name]["outs"] == [f"data/{name}"]
        assert stages[name]["params"] == [name]
        assert f"build {name} --params params.yaml --out data/{name}" in stages[name]["cmd"]
        for dep in stages[name]["deps"]:
            assert (REPO / dep).exists() or dep.startswith("data/"), dep
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert params["tokenizer"]["vocab_size"] == 2048  # the tiny recipe's model.lm.vocab_size


def test_data_code_never_imports_dvc_prefect_or_mlflow():
    files = [*(REPO / "stages" / "data").glob("*.py"), REPO / "model" / "tokenizer.py"]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not {n.split(".")[0] for n in names} & {"dvc", "prefect", "mlflow"}, path.name


@pytest.mark.timeout(240)
def test_repro_locks_then_is_up_to_date_and_reproducible(tmp_path):
    a = _project(tmp_path / "a")
    _dvc(a, "repro")
    assert (a / "dvc.lock").is_file()
    hashes = _out_hashes(a)
    assert set(hashes) == set(DATASETS) and all(h.endswith(".dir") for h in hashes.values())
    assert (a / "data" / "toyworld" / "train" / "records.jsonl").is_file()
    assert {"/toyworld", "/tokenizer"} <= set((a / "data" / ".gitignore").read_text().split())

    again = _dvc(a, "repro")
    assert "didn't change" in again.stdout or "up to date" in again.stdout
    assert "Running stage" not in again.stdout

    b = _project(tmp_path / "b")  # a "fresh clone": same code and params, new directory
    _dvc(b, "repro")
    assert _out_hashes(b) == hashes
