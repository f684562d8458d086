"""Render infra/slurm/flow-run.sbatch.j2 with a site's cluster.yaml into flow-run.sbatch.

    python infra/slurm/render.py [--config infra/slurm/cluster.yaml] [--out infra/slurm/flow-run.sbatch]

Fields are validated (typed, unknown keys rejected) and the template renders with StrictUndefined,
so a missing value is an error naming it, never an empty `#SBATCH` line.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

import jinja2
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "flow-run.sbatch.j2"


class SlurmCluster(BaseModel):
    """One site's allocation shape and paths."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_name: str = "moonforge"
    partition: str
    account: str | None = None
    qos: str | None = None
    nodes: int = Field(ge=1)
    gpus_per_node: int = Field(ge=0, le=16)
    cpus_per_node: int = Field(ge=1)
    exclusive: bool = True
    """Whole nodes (sbatch --exclusive); false lets small jobs share a node."""
    time_limit: str
    log_dir: str
    moonforge_home: str
    venv: str
    master_port: int = Field(29500, ge=1024, le=65535)
    env: dict[str, str] = {}

    @field_validator("time_limit")
    @classmethod
    def _slurm_time(cls, v: str) -> str:
        if not re.fullmatch(r"(\d+-)?\d{1,2}:\d{2}:\d{2}", v):
            raise ValueError(f"time_limit {v!r}: use Slurm's [D-]HH:MM:SS, e.g. 7-00:00:00")
        return v

    @field_validator("env")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [k for k in v if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)]
        if bad:
            raise ValueError(f"env: {bad} are not shell variable names; use letters, digits, _")
        return v


def render(cluster: SlurmCluster, template: Path = TEMPLATE) -> str:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["shquote"] = lambda s: shlex.quote(str(s))
    return env.from_string(template.read_text()).render(**cluster.model_dump())


def load_cluster(path: Path) -> SlurmCluster:
    try:
        return SlurmCluster.model_validate(yaml.safe_load(path.read_text()))
    except ValidationError as e:
        lines = [f"  {'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
        raise SystemExit(f"{path}: invalid cluster config\n" + "\n".join(lines)) from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=HERE / "cluster.yaml")
    ap.add_argument("--out", type=Path, default=HERE / "flow-run.sbatch")
    args = ap.parse_args(argv)
    args.out.write_text(render(load_cluster(args.config)))
    args.out.chmod(0o755)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
