"""The moonforge-slurm work pool's command: submit one flow run as a Slurm job and wait for it.

    python infra/slurm/submit.py [SCRIPT]    # default: $MOONFORGE_HOME/infra/slurm/flow-run.sbatch

Prefect's process worker runs this on a login node for each flow run, with the run's
environment (PREFECT__FLOW_RUN_ID, PREFECT_API_URL, the deployment's env). It runs
`sbatch --parsable --wait --export=ALL SCRIPT`, so the job gets that environment and the flow
runs inside the allocation (`prefect flow-run execute`). Per-run Slurm settings come from
sbatch's own input variables in the job variables' env (SBATCH_PARTITION, SBATCH_ACCOUNT,
SBATCH_TIMELIMIT, ...), which override the script's #SBATCH lines.

What the worker alone would not do:
- refuse early, naming the controller and the fix, when slurmctld does not answer;
- turn sbatch's rejections (unknown partition, account) into a message naming the value and
  what the cluster offers;
- cancel a job that waits for a reason that never clears (an account the partition does not
  allow, a partition limit) instead of waiting forever;
- when the job ends other than COMPLETED (cancelled, time limit, node failure, out of memory,
  a failed flow), mark the flow run Failed with the Slurm job id, state and reason (a killed job
  would otherwise show as "Crashed" without them). The stage's periodic checkpoints survive, so
  rerunning resumes;
- on SIGTERM (the run cancelled in Prefect) `scancel` the job.
Exit status: sbatch's (non-zero when the job did not complete), 1 for a submission error.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

POLL_S = float(os.environ.get("MOONFORGE_SLURM_POLL_S", "5"))
HOPELESS = (
    "InvalidAccount",
    "InvalidQOS",
    "AccountNotAllowed",
    "QOSNotAllowed",
    "PartitionConfig",
    "PartitionNodeLimit",
    "PartitionTimeLimit",
    "BadConstraints",
    "DependencyNeverSatisfied",
    "account_not_known",
    "Invalid_account",
)
"""Pending reasons that never clear by waiting (substrings of scontrol's Reason)."""
FINAL = (
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
)
HINTS = {
    "CANCELLED": "it was cancelled (scancel, an administrator, or a cancel in Prefect)",
    "TIMEOUT": "it reached its time limit ({TimeLimit}) and Slurm killed it; raise time_limit in "
    "infra/slurm/cluster.yaml (or SBATCH_TIMELIMIT) if the stage needs longer",
    "NODE_FAIL": "a node of its allocation failed",
    "PREEMPTED": "it was preempted by a higher-priority job",
    "OUT_OF_MEMORY": "a process ran out of memory",
    "BOOT_FAIL": "its nodes failed to boot",
    "DEADLINE": "it reached its deadline",
    "FAILED": "the flow inside it exited with code {ExitCode}",
}


class SubmitError(RuntimeError):
    """The job could not be submitted; the message names the value and the fix."""


def slurm_conf() -> Path:
    return Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"))


def controller() -> str:
    """host:port of slurmctld as this machine's slurm.conf names it (for messages)."""
    host, port = "?", "6817"
    try:
        for line in slurm_conf().read_text().splitlines():
            key, _, value = line.split("#", 1)[0].strip().partition("=")
            if key.lower() in ("slurmctldhost", "controlmachine") and host == "?":
                host = value.split("(")[0].strip()
            elif key.lower() == "slurmctldport":
                port = value.strip()
    except OSError:
        return f"(no {slurm_conf()}: configless or not a Slurm host)"
    return f"{host}:{port}"


def check_controller() -> None:
    for tool in ("sbatch", "scontrol"):
        if shutil.which(tool) is None:
            raise SubmitError(
                f"no `{tool}` on PATH: run the moonforge-slurm worker on a login "
                "node of the cluster (Slurm's client commands installed)"
            )
    res = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=60)
    out = (res.stdout + res.stderr).strip()
    if res.returncode != 0 or "is UP" not in out:
        first = next((ln for ln in out.splitlines() if ln.strip()), "no answer")
        raise SubmitError(
            f"the Slurm controller {controller()} (SlurmctldHost in {slurm_conf()}) does not answer "
            f"from {socket.gethostname()}: `scontrol ping` says {first.strip()!r}. Start slurmctld "
            "there (e.g. `systemctl start slurmctld`) and check that this host reaches its port, "
            "or point SLURM_CONF at the cluster's slurm.conf"
        )


def job_info(job_id: str) -> dict[str, str]:
    res = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60
    )
    return dict(re.findall(r"(\S+?)=(\S*)", res.stdout)) if res.returncode == 0 else {}


def _script_value(script: Path, option: str) -> str | None:
    env = {"partition": "SBATCH_PARTITION", "account": "SBATCH_ACCOUNT"}[option]
    if os.environ.get(env):
        return os.environ[env]
    m = re.search(rf"^#SBATCH\s+--{option}[= ](\S+)", script.read_text(), re.M)
    return m.group(1) if m else None


def explain_rejection(stderr: str, script: Path) -> str:
    """sbatch's refusal, in words that name the value and the fix."""
    text = stderr.strip()
    if "Unable to contact slurm controller" in text:
        return (
            f"sbatch could not reach the Slurm controller {controller()} (SlurmctldHost in "
            f"{slurm_conf()}): {text}. Start slurmctld or fix SLURM_CONF"
        )
    if "Invalid partition name" in text:
        have = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True).stdout.split()
        return (
            f"partition {_script_value(script, 'partition')!r} does not exist on this cluster "
            f"(it has: {', '.join(have) or 'none listed'}); set `partition:` in "
            "infra/slurm/cluster.yaml and re-render (python infra/slurm/render.py), or set "
            "SBATCH_PARTITION in the deployment's env"
        )
    if "Invalid account" in text:
        return (
            f"account {_script_value(script, 'account')!r} may not submit to partition "
            f"{_script_value(script, 'partition')!r}: {text}. Set `account:` in "
            "infra/slurm/cluster.yaml (your accounts: `sacctmgr show assoc user=$USER`), or "
            "SBATCH_ACCOUNT in the deployment's env"
        )
    return f"sbatch refused the job: {text}"


def describe(job_id: str, info: dict[str, str]) -> str:
    state = info.get("JobState", "UNKNOWN")
    why = HINTS.get(state, "it ended in state {JobState}").format_map(_Default(info))
    resume = (
        " The stage's last periodic checkpoint is kept, so rerunning the flow resumes from it."
        if state != "FAILED"
        else ""
    )
    return (
        f"Slurm job {job_id} ended {state} (Reason={info.get('Reason', '?')}, "
        f"ExitCode={info.get('ExitCode', '?')}, after {info.get('RunTime', '?')} on "
        f"{info.get('NodeList', '?')}, partition {info.get('Partition', '?')}): {why}."
        f"{resume} Job log: {info.get('StdOut', '?')}"
    )


class _Default(dict):
    def __missing__(self, key: str) -> str:
        return "?"


def mark_failed(message: str) -> None:
    """Set the flow run (PREFECT__FLOW_RUN_ID) Failed with `message`, keeping the flow's own
    failure message after it when it set one."""
    run_id = os.environ.get("PREFECT__FLOW_RUN_ID")
    if not run_id:
        return
    from prefect.client.orchestration import get_client
    from prefect.states import Failed

    with get_client(sync_client=True) as client:
        own = client.read_flow_run(run_id).state
        if own is not None and own.is_failed() and own.message and "Slurm job" not in own.message:
            message = f"{message}. The flow run reported: {own.message}"
        client.set_flow_run_state(run_id, Failed(message=message), force=True)


def _log(msg: str) -> None:
    print(f"moonforge-slurm: {msg}", flush=True)


def submit(script: Path) -> int:
    check_controller()
    cmd = ["sbatch", "--parsable", "--wait", "--export=ALL", str(script)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job_id = (proc.stdout.readline().strip().split(";")[0]) if proc.stdout else ""
    if not job_id.isdigit():
        _, err = proc.communicate()
        raise SubmitError(explain_rejection(err, script))
    _log(f"submitted Slurm job {job_id} ({' '.join(cmd)})")
    cancelled = threading.Event()

    def on_term(signum, frame) -> None:  # the flow run was cancelled in Prefect
        cancelled.set()
        subprocess.run(["scancel", job_id], check=False)

    signal.signal(signal.SIGTERM, on_term)
    hopeless = None
    while proc.poll() is None:
        info = job_info(job_id)
        reason = info.get("Reason", "")
        if info.get("JobState") in FINAL:  # sbatch --wait polls every 10 s; don't wait on it
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.terminate()
            break
        if info.get("JobState") == "PENDING" and any(h in reason for h in HOPELESS):
            hopeless = (
                f"Slurm job {job_id} can never start: it waits with Reason={reason} "
                f"(partition {info.get('Partition', '?')}, account "
                f"{info.get('Account', '?')}); cancelled it. Set `partition:` / `account:` "
                "in infra/slurm/cluster.yaml (or SBATCH_PARTITION / SBATCH_ACCOUNT) to a "
                "combination the cluster allows"
            )
            subprocess.run(["scancel", job_id], check=False)
            break
        time.sleep(POLL_S)
    rc = proc.wait()
    if rc < 0:  # we stopped a still-polling sbatch; the job's own state decides
        rc = 0 if job_info(job_id).get("JobState") == "COMPLETED" else 1
    err = proc.stderr.read() if proc.stderr else ""
    if err.strip():
        _log(f"sbatch: {err.strip()}")
    if cancelled.is_set():
        _log(f"Slurm job {job_id} cancelled because the flow run was")
        return rc or 1
    if hopeless:
        raise SubmitError(hopeless)
    info = job_info(job_id)
    deadline = time.time() + 120  # COMPLETING: processes still being cleaned up (KillWait)
    while info and info.get("JobState") not in FINAL and time.time() < deadline:
        time.sleep(POLL_S)
        info = job_info(job_id) or info
    if info.get("JobState") == "COMPLETED" and rc == 0:
        _log(f"Slurm job {job_id} COMPLETED on {info.get('NodeList', '?')} after {info.get('RunTime', '?')}")
        return 0
    message = describe(job_id, info) if info else f"Slurm job {job_id}: sbatch exited {rc}: {err}"
    _log(message)
    mark_failed(message)
    return rc or 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    home = os.environ.get("MOONFORGE_HOME", ".")
    script = Path(argv[0]) if argv else Path(home) / "infra" / "slurm" / "flow-run.sbatch"
    try:
        if not script.is_file():
            raise SubmitError(
                f"no sbatch script at {script}: render it with `python "
                "infra/slurm/render.py` (from infra/slurm/cluster.yaml) and set "
                "MOONFORGE_HOME to the checkout on the shared filesystem"
            )
        return submit(script)
    except SubmitError as e:
        _log(str(e))
        mark_failed(str(e))
        return 1


if __name__ == "__main__":
    sys.exit(main())
