"""infra/: what can be validated without a cluster is validated here. prefect.yaml loads through
Prefect's own deploy model and every entrypoint imports to a real flow with valid parameters; the
work-pool templates render with Prefect's templating; the Kubernetes Job the pool would submit
and the multi-node training manifests (infra/k8s/training_job.py: GPUs and node selector from the
recipe) validate against the Kubernetes API schema (the `kubernetes` client's models: unknown
fields, types, required fields, enums, quantities); the sbatch template renders with every
placeholder filled and passes `bash -n`; the compose file holds together (services, images,
healthchecks, ports on localhost, volumes and mounted files that exist, required secrets).
A real Slurm, Postgres and multi-node run: tests/test_cluster_*.py."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"


def _load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def prefect_yaml() -> dict:
    return yaml.safe_load((INFRA / "prefect.yaml").read_text())


@pytest.fixture(scope="module")
def pools() -> dict[str, dict]:
    """Work pool name -> its base job template (the process pool uses Prefect's default)."""
    from prefect.workers.process import ProcessWorker

    return {
        "moonforge-process": ProcessWorker.get_default_base_job_template(),
        "moonforge-k8s": json.loads((INFRA / "work-pools" / "kubernetes.json").read_text()),
        "moonforge-slurm": json.loads((INFRA / "work-pools" / "slurm.json").read_text()),
    }


# --- prefect.yaml ------------------------------------------------------------------------------


def test_prefect_yaml_loads_through_prefects_deploy_model(prefect_yaml):
    from prefect.cli.deploy._config import _load_deploy_configs_and_actions
    from rich.console import Console

    console = Console(record=True, width=200)
    configs, _ = _load_deploy_configs_and_actions(INFRA / "prefect.yaml", console=console)
    assert "Skipping" not in console.export_text()  # prefect skips a file it cannot validate
    names = sorted((c["entrypoint"].split(":")[1], c["name"]) for c in configs)
    assert names == sorted(
        (f, v) for f in ("lifecycle_deployment", "rerun_deployment") for v in ("process", "k8s", "slurm")
    )
    assert {c["work_pool"]["name"] for c in configs} == {
        "moonforge-process",
        "moonforge-k8s",
        "moonforge-slurm",
    }


def test_entrypoints_are_real_flows_and_parameters_fit_them(prefect_yaml):
    from prefect import Flow

    for dep in prefect_yaml["deployments"]:
        path, func = dep["entrypoint"].split(":")
        assert (ROOT / path).is_file(), f"{dep['entrypoint']}: entrypoints are relative to the repo root"
        mod = _load_module(ROOT / path, f"_entry_{func}")
        flow = getattr(mod, func)
        assert isinstance(flow, Flow), dep["entrypoint"]
        flow.validate_parameters(dep["parameters"])  # raises on unknown / missing / mistyped
        assert flow.name in ("lifecycle", "rerun")


def test_recipes_named_in_deployments_exist_and_validate(prefect_yaml):
    from moonforge.stages.recipe import load_recipe

    for dep in prefect_yaml["deployments"]:
        params = dep["parameters"]["params"]  # one typed parameter (flows/deployments.py)
        rec = load_recipe(ROOT / params["recipe"])
        if "stage" in params:
            rec.stage(params["stage"])


def test_job_variables_are_declared_by_their_pool(prefect_yaml, pools):
    for dep in prefect_yaml["deployments"]:
        pool = dep["work_pool"]
        declared = set(pools[pool["name"]]["variables"]["properties"])
        unknown = set(pool.get("job_variables", {})) - declared
        assert not unknown, f"{dep['entrypoint']} on {pool['name']}: {unknown} are not pool variables"


# --- work-pool templates -----------------------------------------------------------------------


def _render(template: dict, job_variables: dict) -> dict:
    """What a worker does: variable defaults, overridden by the deployment, into the config."""
    from prefect.utilities.templating import apply_values, find_placeholders

    props = template["variables"]["properties"]
    values = {k: v["default"] for k, v in props.items() if "default" in v} | job_variables
    used = {p.name for p in find_placeholders(template["job_configuration"])}
    assert used <= set(props), f"placeholders without a variable: {used - set(props)}"
    return apply_values(template["job_configuration"], values, remove_notset=True)


# --- the Kubernetes API schema, from the kubernetes client's models ------------------------------

QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?$")


def k8s_errors(obj, type_name: str, path: str = "") -> list[str]:
    """What the API server would reject in `obj` as a `type_name` (e.g. "V1Job"): fields the
    schema lacks, wrong JSON types, malformed quantities; then the client's own deserializer
    checks required fields and enum values (it raises ValueError)."""
    import kubernetes.client as k8s

    errs = _walk(obj, type_name, path or type_name)
    if not errs:

        class _Response:
            data = json.dumps(obj)

        try:
            k8s.ApiClient().deserialize(_Response(), type_name)
        except ValueError as e:
            errs.append(f"{path or type_name}: {e}")
    return errs


def _walk(obj, t: str, path: str) -> list[str]:
    import kubernetes.client as k8s

    if t == "object":  # IntOrString and free-form fields
        return []
    if m := re.fullmatch(r"list\[(.+)\]", t):
        if not isinstance(obj, list):
            return [f"{path}: expected a list, got {type(obj).__name__}"]
        return [e for i, v in enumerate(obj) for e in _walk(v, m.group(1), f"{path}[{i}]")]
    if m := re.fullmatch(r"dict\[str, (.+)\]", t):
        if not isinstance(obj, dict):
            return [f"{path}: expected a mapping, got {type(obj).__name__}"]
        quantity = path.endswith((".limits", ".requests"))  # resource quantities: 8 or "8" or "64Gi"
        return [
            f"{path}.{k}: {v!r} is not a quantity"
            for k, v in obj.items()
            if quantity and not (isinstance(v, (int, str)) and QUANTITY.match(str(v)))
        ] + ([] if quantity else [e for k, v in obj.items() for e in _walk(v, m.group(1), f"{path}.{k}")])
    prim = {"str": str, "int": int, "bool": bool, "float": (int, float), "datetime": str}
    if t in prim:
        ok = isinstance(obj, prim[t]) and not (t != "bool" and isinstance(obj, bool))
        return [] if ok else [f"{path}: expected {t}, got {type(obj).__name__} {obj!r}"]
    model = getattr(k8s, t)
    if not isinstance(obj, dict):
        return [f"{path}: expected a {t} object, got {type(obj).__name__}"]
    fields = {json_key: attr for attr, json_key in model.attribute_map.items()}
    errs = [f"{path}.{k}: not a field of {t}" for k in obj if k not in fields]
    for k, v in obj.items():
        if k in fields and v is not None:
            errs += _walk(v, model.openapi_types[fields[k]], f"{path}.{k}")
    return errs


def _as_the_k8s_worker_submits(manifest: dict) -> dict:
    """prefect-kubernetes' last steps before it creates the Job: the env mapping becomes a list
    of {name, value} and the command string the container's args."""
    import shlex

    m = json.loads(json.dumps(manifest))
    container = m["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [{"name": k, "value": v} for k, v in (container.get("env") or {}).items()]
    container["args"] = shlex.split(container.get("args") or "prefect flow-run execute")
    return m


def test_the_schema_check_catches_what_the_api_server_rejects():
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "spec": {
            "template": {
                "spec": {
                    "parallelism": 1,
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "c",
                            "image": "i",
                            "resources": {"limits": {"nvidia.com/gpu": "eight"}},
                            "ports": [{"containerPort": "29400"}],
                        }
                    ],
                }
            }
        },
    }
    errs = k8s_errors(job, "V1Job")
    assert "V1Job.spec.template.spec.parallelism: not a field of V1PodSpec" in errs
    assert (
        "V1Job.spec.template.spec.containers[0].resources.limits.nvidia.com/gpu: 'eight' is not a quantity"
        in errs
    )
    assert (
        "V1Job.spec.template.spec.containers[0].ports[0].containerPort: expected int, got str '29400'" in errs
    )
    missing = k8s_errors({"spec": {"template": {"spec": {"containers": [{"image": "i"}]}}}}, "V1Job")
    assert len(missing) == 1 and "`name`, must not be `None`" in missing[0]


def test_kubernetes_job_requests_gpus_on_gpu_nodes_with_shared_storage(prefect_yaml, pools):
    dep = next(d for d in prefect_yaml["deployments"] if d["work_pool"]["name"] == "moonforge-k8s")
    job_vars = {**dep["work_pool"]["job_variables"], "image": "registry.example/moonforge:abc123"}
    cfg = _render(pools["moonforge-k8s"], job_vars)
    manifest = cfg["job_manifest"]
    assert "{{" not in json.dumps(manifest)
    assert k8s_errors(_as_the_k8s_worker_submits(manifest), "V1Job") == []
    # the prefect-kubernetes worker's required paths (its _get_base_job_manifest)
    assert manifest["apiVersion"] == "batch/v1" and manifest["kind"] == "Job"
    pod = manifest["spec"]["template"]["spec"]
    assert (manifest["spec"]["parallelism"], manifest["spec"]["completions"], pod["restartPolicy"]) == (
        1,
        1,
        "Never",
    )
    (container,) = pod["containers"]
    assert container["name"] == "prefect-job" and container["image"] == job_vars["image"]
    res = container["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == 8
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert manifest["spec"]["backoffLimit"] == 0  # retries are Prefect's decision, not the kubelet's
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert {m["name"] for m in container["volumeMounts"]} <= set(volumes)
    assert volumes["shared"]["persistentVolumeClaim"]["claimName"] == "moonforge-shared"
    assert cfg["env"]["MOONFORGE_STORE"].startswith("s3://")


def test_training_job_manifests_take_gpus_and_node_selector_from_the_recipe():
    """infra/k8s/training_job.py for kimi-vl-a3b's sft on 8 nodes x 8 GPUs (its 128K phase has 64
    rows per step: 16 nodes would leave ranks without one, which the recipe refuses)."""
    tj = _load_module(INFRA / "k8s" / "training_job.py", "_training_job")
    from moonforge.stages.recipe import load_recipe

    recipe = load_recipe(
        ROOT / "recipes" / "kimi-vl-a3b.yaml",
        [
            "stages.sft.launcher.kind=deepspeed",
            "stages.sft.launcher.nnodes=8",
            "stages.sft.launcher.nproc_per_node=8",
            "stages.sft.launcher.node_selector={nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}",
        ],
    )
    service, job = tj.manifests(
        recipe, "sft", "registry.example/moonforge:abc123", "/shared/launch/sft/job.json"
    )
    assert k8s_errors(service, "V1Service") == [] and k8s_errors(job, "V1Job") == []
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"], spec["backoffLimit"]) == (
        "Indexed",
        8,
        8,
        0,
    )
    (container,) = pod["containers"]
    assert container["resources"]["requests"] == container["resources"]["limits"] == {"nvidia.com/gpu": "8"}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert container["command"][-3:] == ["moonforge.registry.launch", "node", "/shared/launch/sft/job.json"]
    env = {e["name"]: e["value"] for e in container["env"]}
    name = job["metadata"]["name"]
    assert (
        env["MASTER_ADDR"] == f"{name}-0.{name}" and pod["subdomain"] == service["metadata"]["name"] == name
    )
    assert service["spec"]["clusterIP"] == "None"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63

    cpu = load_recipe(
        ROOT / "recipes" / "kimi-vl-a3b.yaml",
        [
            "stages.sft.launcher.kind=torchrun",
            "stages.sft.launcher.nnodes=2",
            "stages.sft.launcher.backend=gloo",
        ],
    )
    _, cpu_job = tj.manifests(cpu, "sft", "img", "/shared/j.json")
    assert cpu_job["spec"]["template"]["spec"]["containers"][0]["resources"] == {"requests": {}, "limits": {}}
    assert k8s_errors(cpu_job, "V1Job") == []


def test_slurm_pool_submits_the_rendered_sbatch_and_waits(prefect_yaml, pools):
    from prefect.workers.process import ProcessWorker

    default = ProcessWorker.get_default_base_job_template()
    assert pools["moonforge-slurm"]["job_configuration"] == default["job_configuration"]  # a process pool
    for cmd in [pools["moonforge-slurm"]["variables"]["properties"]["command"]["default"]] + [
        d["work_pool"]["job_variables"]["command"]
        for d in prefect_yaml["deployments"]
        if d["work_pool"]["name"] == "moonforge-slurm"
    ]:
        assert "infra/slurm/submit.py" in cmd and "infra/slurm/flow-run.sbatch" in cmd
    submit = (INFRA / "slurm" / "submit.py").read_text()
    assert '["sbatch", "--parsable", "--wait", "--export=ALL", str(script)]' in submit


# --- Slurm ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm():
    return _load_module(INFRA / "slurm" / "render.py", "_slurm_render")


def test_sbatch_template_renders_every_placeholder_and_is_valid_bash(slurm, tmp_path):
    cluster = slurm.load_cluster(INFRA / "slurm" / "cluster.yaml")
    cluster = cluster.model_copy(update={"account": "proj42", "env": {**cluster.env, "X": "a b$c"}})
    text = slurm.render(cluster)
    assert "{{" not in text and "{%" not in text
    sbatch = dict(re.findall(r"^#SBATCH --([a-z-]+)=(.*)$", text, re.M))
    assert sbatch["nodes"] == "64" and sbatch["gpus-per-node"] == "8" and sbatch["account"] == "proj42"
    assert sbatch["time"] == "7-00:00:00" and sbatch["partition"] == "gpu"
    assert "export X='a b$c'" in text  # values are shell-quoted, never expanded
    assert 'exec prefect flow-run execute "$PREFECT__FLOW_RUN_ID"' in text
    out = tmp_path / "run.sbatch"
    assert slurm.main(["--out", str(out)]) == 0 and out.read_text().startswith("#!/bin/bash")
    subprocess.run(["bash", "-n", str(out)], check=True)
    assert "#SBATCH --account" not in out.read_text()  # null account: no empty directive


def test_submit_explains_sbatch_rejections_naming_the_value(tmp_path, monkeypatch):
    """What a cluster with accounting (slurmdbd) says at submission, which the one-node test
    cluster cannot: an account refused by sbatch itself; and the controller named from slurm.conf."""
    submit = _load_module(INFRA / "slurm" / "submit.py", "_slurm_submit")
    script = tmp_path / "run.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --partition=gpu\n#SBATCH --account=proj42\n")
    msg = submit.explain_rejection(
        "sbatch: error: Batch job submission failed: Invalid account "
        "or account/partition combination specified",
        script,
    )
    assert msg.startswith("account 'proj42' may not submit to partition 'gpu'")
    assert "sacctmgr show assoc user=$USER" in msg and "SBATCH_ACCOUNT" in msg
    monkeypatch.setenv("SBATCH_ACCOUNT", "other")
    assert "account 'other'" in submit.explain_rejection("Invalid account", script)
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=c\nSlurmctldHost=head01(10.0.0.1)\nSlurmctldPort=7817\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    assert submit.controller() == "head01:7817"
    assert "Start slurmctld" in submit.explain_rejection(
        "sbatch: error: Batch job submission failed: Unable to contact slurm controller", script
    )


def test_sbatch_template_names_a_missing_value(slurm, tmp_path):
    import jinja2

    cluster = slurm.load_cluster(INFRA / "slurm" / "cluster.yaml")
    bad = tmp_path / "t.j2"
    bad.write_text((INFRA / "slurm" / "flow-run.sbatch.j2").read_text() + "{{ nodes_typo }}\n")
    with pytest.raises(jinja2.UndefinedError, match="nodes_typo"):
        slurm.render(cluster, bad)


@pytest.mark.parametrize(
    "field, value, msg",
    [
        ("time_limit", "a week", "use Slurm's"),
        ("nodes", 0, "nodes"),
        ("partitoin", "gpu", "partitoin"),
    ],
)
def test_bad_cluster_config_names_the_field(slurm, tmp_path, field, value, msg):
    data = yaml.safe_load((INFRA / "slurm" / "cluster.yaml").read_text()) | {field: value}
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SystemExit, match=msg):
        slurm.load_cluster(path)


# --- compose -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def test_compose_services_images_healthchecks_and_dependencies(compose):
    services = compose["services"]
    assert {"postgres", "prefect-server", "mlflow", "minio", "buckets"} <= set(services)
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        if "image" in svc and "build" not in svc:
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", svc["image"]) and not svc["image"].endswith(":latest"), (
                name
            )
        if name != "buckets":  # long-running services report health for depends_on
            assert svc["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}'s missing healthcheck"
    assert services["prefect-server"]["image"].startswith("prefecthq/prefect:3.8.8")


def test_compose_ports_bind_to_localhost_and_volumes_exist(compose):
    base = INFRA
    named = set(compose.get("volumes") or {})
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port} would listen on every interface"
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (base / src).exists(), f"{name}: mounts missing {src}"
            else:
                assert src in named, f"{name}: volume {src} is not declared"
        build = svc.get("build")
        if build:
            assert (base / build["context"] / build["dockerfile"]).is_file()
    ports = {p.split(":")[1] for s in compose["services"].values() for p in s.get("ports", [])}
    assert {"4200", "5000", "9000"} <= ports


def _compose_default(value: str, var: str) -> str:
    """`${VAR:-default}` -> default (the bundled Postgres); the URL is overridable by VAR."""
    m = re.fullmatch(rf"\$\{{{var}:-(.*)\}}", value)
    assert m, f"{value!r}: expected ${{{var}:-...}} so a site can point at its own Postgres"
    return m.group(1)


def test_compose_database_and_s3_uris_are_well_formed(compose):
    from sqlalchemy.engine import make_url

    env = compose["services"]["prefect-server"]["environment"]
    url = make_url(
        _compose_default(env["PREFECT_API_DATABASE_CONNECTION_URL"], "PREFECT_DATABASE_URL").replace(
            "${POSTGRES_PASSWORD}", "pw"
        )
    )
    assert (url.drivername, url.host, url.database) == ("postgresql+asyncpg", "postgres", "prefect")
    cmd = compose["services"]["mlflow"]["command"]
    backend = compose["services"]["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert not [a for a in cmd if "backend-store-uri" in a]  # no password in the process list
    url = make_url(_compose_default(backend, "MLFLOW_DATABASE_URL").replace("${MLFLOW_DB_PASSWORD}", "pw"))
    assert (url.drivername, url.host, url.database) == ("postgresql+psycopg2", "postgres", "mlflow")
    assert "--artifacts-destination=s3://mlflow/" in cmd
    buckets = compose["services"]["buckets"]["command"][0]
    assert "local/mlflow" in buckets and "local/moonforge-artifacts" in buckets
    # every ${VAR} the file uses is documented in the example env file
    used = set(re.findall(r"\$\{(\w+)", (INFRA / "compose.yaml").read_text()))
    example = (INFRA / "compose" / ".env.example").read_text()
    assert used <= set(re.findall(r"^(\w+)=", example, re.M))


def test_postgres_init_creates_the_mlflow_database():
    sql = (INFRA / "compose" / "initdb.sql").read_text()
    assert "CREATE DATABASE mlflow OWNER mlflow" in sql and ":'mlflow_password'" in sql
    hook = (INFRA / "compose" / "initdb.sh").read_text()
    assert 'mlflow_password="$MLFLOW_DB_PASSWORD"' in hook
    subprocess.run(["bash", "-n", str(INFRA / "compose" / "initdb.sh")], check=True)
