"""Kubernetes manifests for one stage's multi-node training: a headless Service + an indexed Job.

    python infra/k8s/training_job.py RECIPE STAGE --image REGISTRY/moonforge:TAG \
        --job-file /shared/launch/<stage>/job.json [--set stages.sft.launcher.nnodes=8 ...]

prints YAML for `kubectl apply -f -`. The shape comes from the recipe's launcher section: one
pod per node (`launcher.nnodes`, an Indexed Job: completions = parallelism = nnodes, node rank =
JOB_COMPLETION_INDEX), `launcher.nproc_per_node` whole GPUs per pod (requested and limited alike;
none for backend gloo), `launcher.node_selector` as the pods' nodeSelector. Every pod runs the node
launcher (registry/launch.py) on the job file, which the flow writes on the shared volume
(MOONFORGE_LAUNCH_DIR=/shared/launch); the rendezvous is pod 0, reachable as
<name>-0.<name> through the headless Service (MASTER_ADDR / MASTER_PORT). backoffLimit 0: a lost
node fails the stage and the rerun resumes from the last checkpoint.

Validated against the Kubernetes API schema (the `kubernetes` client's models) in
tests/test_infra.py; not applied to a cluster here, and no launcher submits it yet (docs/cluster.md).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import yaml

RDZV_PORT = 29400
SHARED = "/shared"


def _dns_name(*parts: str) -> str:
    """A DNS-1123 label (lowercase alphanumerics and '-', at most 63 characters)."""
    name = re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")
    return name[:63].rstrip("-") or "moonforge"


def manifests(
    recipe: Any,
    stage: str,
    image: str,
    job_file: str,
    *,
    namespace: str = "moonforge",
    shared_claim: str = "moonforge-shared",
    shm_size: str = "64Gi",
    service_account: str = "moonforge",
    s3_secret: str = "moonforge-s3",
) -> list[dict]:
    """[Service, Job] for `stage` of `recipe` (a moonforge.stages.recipe.Recipe)."""
    cfg = recipe.stage(stage)
    la = cfg.launcher
    name = _dns_name("mf", recipe.name, cfg.stage_name)
    labels = {
        "app.kubernetes.io/name": "moonforge",
        "moonforge/stage": cfg.stage_name,
        "moonforge/training-job": name,
    }
    gpus = {} if la.backend == "gloo" else {"nvidia.com/gpu": str(la.nproc_per_node)}
    env = [
        {"name": "MASTER_ADDR", "value": f"{name}-0.{name}"},
        {"name": "MASTER_PORT", "value": str(RDZV_PORT)},
        {"name": "MOONFORGE_LAUNCH_DIR", "value": f"{SHARED}/launch"},
        {"name": "NCCL_SOCKET_IFNAME", "value": "eth0"},
    ]
    container = {
        "name": "node",
        "image": image,
        "command": ["python", "-m", "moonforge.registry.launch", "node", job_file],
        "env": env,
        "envFrom": [{"secretRef": {"name": s3_secret}}],
        "ports": [{"name": "rendezvous", "containerPort": RDZV_PORT}],
        "resources": {"requests": dict(gpus), "limits": dict(gpus)},
        "volumeMounts": [{"name": "shared", "mountPath": SHARED}, {"name": "dshm", "mountPath": "/dev/shm"}],
    }
    pod = {
        "metadata": {"labels": labels},
        "spec": {
            "restartPolicy": "Never",
            "subdomain": name,  # with the headless Service: <name>-<index>.<name> resolves
            "serviceAccountName": service_account,
            "nodeSelector": dict(la.node_selector),
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
            if gpus
            else [],
            "containers": [container],
            "volumes": [
                {"name": "shared", "persistentVolumeClaim": {"claimName": shared_claim}},
                {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}},
            ],
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "clusterIP": "None",
            "selector": {"moonforge/training-job": name},
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": RDZV_PORT, "targetPort": RDZV_PORT}],
        },
    }
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "completionMode": "Indexed",
            "completions": la.nnodes,
            "parallelism": la.nnodes,
            "backoffLimit": 0,
            "ttlSecondsAfterFinished": 86400,
            "template": pod,
        },
    }
    return [service, job]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("stage")
    ap.add_argument("--image", required=True, help="the training image (infra/Dockerfile)")
    ap.add_argument("--job-file", required=True, help="the stage's job.json on the shared volume")
    ap.add_argument("--namespace", default="moonforge")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="recipe override, e.g. stages.sft.launcher.nnodes=8",
    )
    args = ap.parse_args(argv)
    from moonforge.stages.recipe import RecipeError, load_recipe

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        docs = manifests(recipe, args.stage, args.image, args.job_file, namespace=args.namespace)
    except (RecipeError, KeyError, ValueError) as e:
        print(f"training_job: {e}", file=sys.stderr)
        return 1
    print(yaml.safe_dump_all(docs, sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
