"""Leases: one builder per (stage, fingerprint) at a time, and how the others learn it died.

Two runs of one stage with one fingerprint (two people pressing "rerun") must not both train: the
first takes the lease, the second waits and then reuses what the first committed (a cache hit on
the same version). If the holder dies (kill -9, OOM, a lost node), its lease ends and a waiter
takes over, resuming from the holder's last periodic checkpoint.

- Local store: an exclusive `flock` on `<stage>/.lease-<fp16>`. The kernel drops it the moment the
  holder dies, whatever killed it; the file holds the holder's record (host, pid, MLflow run ids),
  so a taker-over can close what the dead holder left open.
- S3 store: the object `<prefix>/<stage>/.lease-<fp16>`, created with a conditional put
  (If-None-Match: *), renewed by its holder every ttl/3 with a put conditional on its own ETag
  (If-Match), and expired `ttl` seconds after its last renewal: a waiter then replaces it with a
  put conditional on the expired ETag, so exactly one waiter takes over.

`Heartbeat` renews a lease from a daemon thread while the stage trains (and lets the S3 store
upload new periodic checkpoints on the same beat).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("moonforge.registry.lease")

LEASE_PREFIX = ".lease-"
DEFAULT_TTL_S = 60.0
TTL_ENV = "MOONFORGE_LEASE_TTL_S"
"""Seconds an S3 lease lives without renewal (default 60): how long a waiter waits for a dead
holder on another machine."""

WaitFn = Callable[[dict], None]
"""Called with the holder's record while waiting for someone else's lease."""


def lease_ttl_s() -> float:
    return float(os.environ.get(TTL_ENV) or DEFAULT_TTL_S)


def _pid_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), so a
    recycled pid is not mistaken for the process that died."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def this_process() -> dict[str, Any]:
    """Who is running: host, pid and the pid's start time."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _pid_start(os.getpid())}


def process_alive(record: dict) -> bool | None:
    """Whether the process a record names is still running: True / False on this host, None for
    another host (only a lease's expiry can tell)."""
    if record.get("host") != socket.gethostname() or not record.get("pid"):
        return None
    pid = int(record["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    start = _pid_start(pid)
    if start is None:
        return False
    if record.get("pid_start") and start != record["pid_start"]:
        return False  # the pid was recycled
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Lease:
    """The right to build one (stage, fingerprint). `previous` is the record of a holder that died
    holding it (None if it was free); `info` is ours (run ids are added with `update`)."""

    def __init__(self, stage: str, fingerprint: str, info: dict, previous: dict | None):
        self.stage, self.fingerprint = stage, fingerprint
        self.info, self.previous = info, previous
        self.lost = False
        self._lock = threading.Lock()

    def update(self, **info: Any) -> None:
        """Add to the holder record (e.g. the MLflow run ids) and write it now."""
        with self._lock:
            self.info.update(info)
        self.renew()

    def renew(self) -> bool:
        """Refresh the lease; False once it was lost to someone else."""
        return True

    def release(self) -> None:
        """Give the lease up (after commit, or on failure)."""


class LocalLease(Lease):
    def __init__(self, stage: str, fingerprint: str, info: dict, previous: dict | None, path: Path, fd: int):
        super().__init__(stage, fingerprint, info, previous)
        self.path, self._fd = path, fd
        self.renew()

    def renew(self) -> bool:
        with self._lock:
            if self._fd < 0:
                return False
            self.info["renewed"] = time.time()
            data = json.dumps(self.info, default=str).encode()
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
        return True

    def release(self) -> None:
        with self._lock:
            if self._fd < 0:
                return
            try:
                os.unlink(self.path)  # while locked: a waiter then sees a new inode and retries
            except FileNotFoundError:
                pass
            os.close(self._fd)  # drops the flock
            self._fd = -1


def _read_fd(fd: int) -> dict | None:
    try:
        raw = os.pread(fd, 1 << 16, 0)
        obj = json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def try_local_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on `path` (created if missing), or None when another
    process holds it. The lock is on the inode `path` names at return (a file unlinked while we
    waited is retried)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return None
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # it was released and unlinked while we opened it: lock the new one


def acquire_local(path: Path, stage: str, fingerprint: str, wait: WaitFn | None, poll_s: float) -> LocalLease:
    """Block until we hold the flock on `path`; the file's old content (a dead holder's record)
    becomes `previous`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = try_local_lock(path)
        if fd is not None:
            previous = _read_fd(fd)
            info = {**this_process(), "id": uuid.uuid4().hex, "acquired": time.time()}
            return LocalLease(stage, fingerprint, info, previous, path, fd)
        if wait is not None:
            wait(read_holder(path) or {})
        time.sleep(poll_s)


def read_holder(path: Path) -> dict | None:
    """The record in a lease file (whoever holds it, or a dead holder's), if any."""
    try:
        obj = json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def local_lease_held(path: Path) -> bool:
    """Whether a live process holds the lease file's flock (probes it without keeping it)."""
    if not path.exists():
        return False
    fd = try_local_lock(path)
    if fd is None:
        return True
    os.close(fd)
    return False


class Heartbeat:
    """Renews a lease every `every_s` seconds from a daemon thread; `also()` (the S3 store uploads
    new periodic checkpoints there) runs on the same beat from a second thread, so an upload that
    takes longer than the lease's ttl never delays a renewal and loses the lease to a waiter.
    stop() ends both, after an `also()` in progress."""

    def __init__(self, lease: Lease, every_s: float, also: Callable[[], None] | None = None):
        self.lease, self.every_s, self.also = lease, every_s, also
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._renew, name=f"lease-{lease.stage}", daemon=True)]
        if also is not None:
            self._threads.append(threading.Thread(target=self._also, name=f"sync-{lease.stage}", daemon=True))

    def __enter__(self) -> Heartbeat:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            if t.is_alive():
                t.join(timeout=60)

    def _renew(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                if not self.lease.renew():
                    log.error(
                        "%s: lost the lease on fingerprint %s to another run; it will "
                        "reuse or redo this work",
                        self.lease.stage,
                        self.lease.fingerprint[:12],
                    )
                    self._stop.set()  # and stop syncing: the new holder owns the partial work
                    return
            except Exception as e:  # a missed beat is retried on the next one
                log.warning(
                    "%s: lease heartbeat failed (%s: %s); retrying", self.lease.stage, type(e).__name__, e
                )

    def _also(self) -> None:
        assert self.also is not None  # only started with one
        while not self._stop.wait(self.every_s):
            try:
                self.also()
            except Exception as e:  # retried on the next beat
                log.warning(
                    "%s: sync on heartbeat failed (%s: %s); retrying", self.lease.stage, type(e).__name__, e
                )
