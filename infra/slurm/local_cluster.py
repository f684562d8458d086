"""A one-node Slurm cluster on this machine (127.0.0.1), for trying the Slurm path and for tests.

    python infra/slurm/local_cluster.py up DIR [--cpus 4]   # then: export SLURM_CONF=DIR/slurm.conf
    python infra/slurm/local_cluster.py down DIR

`up` writes DIR/slurm.conf and a fresh munge key, and starts munged (its socket in DIR),
slurmctld and slurmd in the foreground of their own sessions (pids in DIR/pids.json, logs in
DIR/log/); it returns once the node is idle. Needs root and Debian's `slurm-wlm` and `munge`
(`make slurm`). Nothing is read from or written to /etc: the ports are free ones, the state and
spool directories live in DIR. No cgroups (`proctrack/linuxproc`, `task/none`), so it runs in a
container. Partitions: `debug` (the default, every account) and `restricted` (only account
`restricted`: a job of any other account can never start there).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
NODE = "mfnode"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_tools() -> list[str]:
    """The Debian programs `up` needs that are not installed."""
    need = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo")
    return [t for t in need if shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists()]


def _exe(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def slurm_conf(d: Path, ctld_port: int, slurmd_port: int, cpus: int) -> str:
    host = socket.gethostname()
    return f"""# A one-node Slurm cluster written by infra/slurm/local_cluster.py (test / trial use only).
ClusterName=moonforge-local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={d / "munge.sock"}
CredType=cred/munge
StateSaveLocation={d / "state"}
SlurmdSpoolDir={d / "spool"}
SlurmctldPidFile={d / "slurmctld.pid"}
SlurmdPidFile={d / "slurmd.pid"}
SlurmctldLogFile={d / "log" / "slurmctld.log"}
SlurmdLogFile={d / "log" / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
# 30 s between SIGTERM and SIGKILL on cancel / time limit: the flow keeps its last checkpoint.
KillWait=30
MinJobAge=3600
InactiveLimit=0
NodeName={NODE} NodeAddr=127.0.0.1 NodeHostname={host} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
PartitionName=restricted Nodes={NODE} MaxTime=INFINITE State=UP AllowAccounts=restricted
"""


@dataclass
class LocalSlurm:
    """The daemons of one local cluster; `procs` is set when this process started them."""

    dir: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.dir / "slurm.conf"

    def env(self) -> dict[str, str]:
        """Variables a Slurm client (sbatch, srun, scontrol) needs to reach this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def up(self, cpus: int = 4, timeout: float = 60.0) -> LocalSlurm:
        missing = missing_tools()
        if missing:
            raise RuntimeError(
                f"missing {', '.join(missing)}: install Debian's slurm-wlm and munge (`make slurm`, as root)"
            )
        d = self.dir
        for sub in ("state", "spool", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        d.chmod(0o755)  # munged wants its socket directory searchable by everyone
        key = d / "munge.key"
        if not key.exists():
            subprocess.run([_exe("mungekey"), "--create", f"--keyfile={key}"], check=True)
        key.chmod(0o600)
        self.conf.write_text(slurm_conf(d, _free_port(), _free_port(), cpus))
        env = {**os.environ, "SLURM_CONF": str(self.conf)}
        argv = {
            "munged": [
                _exe("munged"),
                "--foreground",
                f"--socket={d / 'munge.sock'}",
                f"--key-file={key}",
                f"--pid-file={d / 'munged.pid'}",
                f"--seed-file={d / 'munged.seed'}",
                f"--log-file={d / 'log' / 'munged.log'}",
            ],
            "slurmctld": [_exe("slurmctld"), "-D", "-c", "-f", str(self.conf)],
            "slurmd": [_exe("slurmd"), "-D", "-N", NODE, "-f", str(self.conf)],
        }
        try:
            for name in DAEMONS:
                with (d / "log" / f"{name}.out").open("ab") as fh:
                    self.procs[name] = subprocess.Popen(
                        argv[name],
                        env=env,
                        stdout=fh,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,
                    )
                if name == "munged":
                    self._wait(lambda: (d / "munge.sock").exists(), "munged's socket", 20)
            (d / "pids.json").write_text(json.dumps({n: p.pid for n, p in self.procs.items()}))
            self._wait(self._idle, f"node {NODE} idle in sinfo", timeout)
        except BaseException:
            self.down()
            raise
        return self

    def _idle(self) -> bool:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                log = (self.dir / "log" / f"{name}.out").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log}")
        res = subprocess.run(
            ["sinfo", "-h", "-n", NODE, "-o", "%t"],
            capture_output=True,
            text=True,
            env={**os.environ, **self.env()},
        )
        return res.returncode == 0 and res.stdout.strip().startswith("idle")

    def _wait(self, cond, what: str, timeout: float) -> None:
        deadline = time.time() + timeout
        while not cond():
            if time.time() > deadline:
                raise RuntimeError(f"local Slurm: no {what} after {timeout:.0f}s; logs in {self.dir / 'log'}")
            time.sleep(0.2)

    def down(self, grace: float = 15.0) -> None:
        """Stop the daemons (slurmd first), those this object started or DIR/pids.json names."""
        pids = {n: p.pid for n, p in self.procs.items()}
        if not pids and (self.dir / "pids.json").exists():
            pids = json.loads((self.dir / "pids.json").read_text())
        for name in reversed(DAEMONS):
            pid = pids.get(name)
            if pid is None:
                continue
            try:
                os.killpg(pid, signal.SIGTERM)  # its own session: its children too
            except ProcessLookupError:
                continue
            deadline = time.time() + grace
            while time.time() < deadline and _alive(pid, self.procs.get(name)):
                time.sleep(0.1)
            if _alive(pid, self.procs.get(name)):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if name in self.procs:
                self.procs[name].wait()
        (self.dir / "pids.json").unlink(missing_ok=True)


def _alive(pid: int, proc: subprocess.Popen | None) -> bool:
    if proc is not None:
        return proc.poll() is None
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=("up", "down"))
    ap.add_argument("dir", type=Path, help="where the config, state, socket and logs live")
    ap.add_argument("--cpus", type=int, default=4, help="CPUs the node offers (may exceed the real ones)")
    args = ap.parse_args(argv)
    cluster = LocalSlurm(args.dir.resolve())
    if args.action == "down":
        cluster.down()
        print(f"stopped the local Slurm cluster in {cluster.dir}")
        return 0
    try:
        cluster.up(cpus=args.cpus)
    except (RuntimeError, subprocess.CalledProcessError) as e:
        print(f"local Slurm: {e}", file=sys.stderr)
        return 1
    print(
        f"local Slurm cluster up (node {NODE}, partitions debug and restricted); use it with:\n"
        f"  export SLURM_CONF={cluster.conf}\nstop it with: python {sys.argv[0]} down {cluster.dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
