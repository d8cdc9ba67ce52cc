"""The run lock: one training run per workdir at a time.

A run holds `<workdir>/run.lock`, a small JSON file (pid, host, start time, command line), created
atomically with O_CREAT | O_EXCL: of two runs started together in one workdir exactly one creates
it, and the other stops with a `UserError` naming the holder (pid, host, since when) and what to
do. Without it both would write config.json, metrics and checkpoints of the same steps into the same
folders, and each would resume from the other's checkpoints.

A lock whose process is gone (its host is this host and its pid is dead, a zombie, or a different
process that reuses the pid) is stale: it is taken over with a warning. A lock held from another
host cannot be checked from here and is never taken over. The lock is removed when the run ends
(normally, with an error, after SIGTERM: `release` runs from the run's `finally`); a run killed
with SIGKILL leaves a stale lock that the next run takes over.

Under torchrun only rank 0 takes the lock (the workdir is rank 0's). Stdlib only: cheap to import.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import json
import logging
import os
import socket
import sys
import time
import uuid
from pathlib import Path

from .errors import UserError

__all__ = ["LOCK_NAME", "LockInfo", "RunLock", "WorkdirBusy"]

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"


class WorkdirBusy(UserError):
    """Another run holds the workdir's lock."""


@dataclasses.dataclass(frozen=True)
class LockInfo:
    """What a lock file says about its holder."""

    pid: int
    host: str
    started: str  # ISO 8601, local time with offset
    command: str
    token: str  # random, tells our own lock from one that replaced it
    proc_start: int | None = None  # the pid's start time (/proc/<pid>/stat field 22): tells pid reuse apart

    @classmethod
    def mine(cls) -> LockInfo:
        now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        return cls(pid=os.getpid(), host=socket.gethostname(), started=now, command=" ".join(sys.argv),
                   token=uuid.uuid4().hex, proc_start=_proc_start(os.getpid()))

    def describe(self) -> str:
        command = self.command if len(self.command) <= 100 else self.command[:97] + "..."
        return f"pid {self.pid} on host {self.host} since {self.started} ({command})"


def _proc_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), None where /proc cannot say."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces: split after the last ')'
    fields = stat.rsplit(")", 1)[-1].split()
    try:
        return int(fields[19])  # field 22 overall; fields[0] is field 3 (the state)
    except (IndexError, ValueError):
        return None


def _pid_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError):
        return None


def holder_alive(info: LockInfo) -> bool:
    """Whether the lock's process still runs. Only answerable on the lock's own host: a lock taken
    on another host counts as alive."""
    if info.host != socket.gethostname():
        return True
    if info.pid <= 0:
        return False
    try:
        os.kill(info.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    if _pid_state(info.pid) == "Z":
        return False  # exited, not yet reaped by its parent
    if info.proc_start is not None:
        start = _proc_start(info.pid)
        if start is not None and start != info.proc_start:
            return False  # the pid now belongs to another process
    return True


def _read(path: Path) -> LockInfo | None:
    """The lock's content, or None when it is unreadable or not ours (a half-written or foreign file)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        fields = {f.name for f in dataclasses.fields(LockInfo)}
        return LockInfo(**{k: v for k, v in raw.items() if k in fields})
    except (OSError, ValueError, TypeError):
        return None


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


class RunLock:
    """`RunLock.acquire(workdir)` ... `lock.release()` (or a `with` block)."""

    def __init__(self, path: Path, info: LockInfo):
        self.path, self.info = path, info

    @classmethod
    def acquire(cls, workdir: str | os.PathLike) -> RunLock:
        """Take `<workdir>/run.lock` (the folder must exist); a `WorkdirBusy` when another run holds it."""
        path = Path(workdir) / LOCK_NAME
        for _ in range(3):  # a stale lock taken over, then possibly lost to a run doing the same
            info = LockInfo.mine()
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read(path)
                if holder is None and _age_s(path) < 10:
                    raise WorkdirBusy(f"{workdir} is being taken by another run starting right now",
                                      "wait for it to finish, or pass a different --workdir") from None
                if holder is None:
                    raise WorkdirBusy(
                        f"{path} exists but cannot be read as a run lock",
                        f"if no run is using {workdir}, delete {path}; or pass a different --workdir",
                    ) from None
                if holder_alive(holder):
                    raise WorkdirBusy(
                        f"{workdir} is in use by another run: {holder.describe()}",
                        "wait for it to finish, or pass a different --workdir"
                        + ("" if holder.host == socket.gethostname()
                           else f"; if that run is gone, delete {path}"),
                    ) from None
                cls._take_over(path, holder)
                continue
            except OSError as error:
                if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                    raise
                raise UserError(f"cannot write into --workdir {workdir}: {error.strerror}",
                                "choose a --workdir you can write to") from None
            try:
                os.write(fd, json.dumps(dataclasses.asdict(info), indent=1).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            return cls(path, info)
        raise WorkdirBusy(f"{workdir}: another run took the lock {path} at the same time",
                          "wait for it to finish, or pass a different --workdir")

    @staticmethod
    def _take_over(path: Path, stale: LockInfo) -> None:
        """Remove a stale lock, unless another run replaced it since it was read: the file is renamed
        aside first (atomic: of two runs taking it over, one gets it) and put back if it changed."""
        aside = path.with_name(f"{path.name}.stale.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return  # someone else removed it: try to create it again
        moved = _read(aside)
        if moved is None or moved.token != stale.token:
            try:
                os.link(aside, path)  # put the newer lock back, unless yet another run made one
            except FileExistsError:
                pass
            os.unlink(aside)
            return
        os.unlink(aside)
        log.warning("took over the stale run lock %s of %s, which no longer runs", path, stale.describe())

    def release(self) -> None:
        """Remove the lock if it is still ours (idempotent)."""
        current = _read(self.path)
        if current is not None and current.token == self.info.token:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()
