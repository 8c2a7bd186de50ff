"""One run per output directory: an exclusive lock taken first by `Trainer` (before the output
directory is read or anything loads) and held until its `fit` ends or it is closed.

Two runs writing one output directory interleave their metrics.jsonl lines, checkpoints and
config.yaml, and both exit 0. The lock is `<output_dir>/.jdpo.lock`, held with `fcntl.flock` by
process 0 of the run (the processes of one multi-host run share it; the decision to refuse is
unanimous, so no worker is left waiting in a collective). The file records who holds it (host, pid,
start time) for the message a second run gets.

Within one process, a newer Trainer on the same directory takes the lock over from an older one that
is not training (a notebook re-creating its trainer; `fit` takes it back when it can); one that is
training, or a `with RunLock(...)` block, keeps it.

What is guaranteed: on a local filesystem, and on a network filesystem whose `flock` is honoured
across hosts (NFSv4, Lustre, GPFS and Filestore do), a second run refuses to start while the first
lives, and the lock is released on any exit (the kernel drops it when the process dies, even on
SIGKILL), so a dead run's lock never blocks; its leftover file is taken over with a message. What is not:
on an object store (gs://, s3://) there is no lock at all (a warning says so), and on a network
filesystem that ignores `flock` across hosts, two runs on two hosts are not detected.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from jdpo.errors import UserError
from jdpo.parallel.distributed import any_process

log = logging.getLogger(__name__)

LOCK_FILE = ".jdpo.lock"

_HELD: dict[str, RunLock] = {}  # lock file -> the RunLock of this process holding it


class RunLockedError(UserError, RuntimeError):
    """Another live run holds the output directory; the message names it."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


class RunLock:
    """`with RunLock(output_dir): ...` holds the directory's lock (on process 0; a no-op elsewhere)."""

    def __init__(self, output_dir, *, main_process: bool = True):
        self.output_dir = output_dir
        self.main_process = main_process
        self._fd: int | None = None
        self._warned = False  # an object store's "no lock" warning, once
        self.held = False  # acquired and not released (process 0 holds the file)
        self.in_use = False  # a run is training under it: no other lock of this process takes it over

    def __enter__(self) -> RunLock:
        self.acquire()
        self.in_use = True
        return self

    def __exit__(self, *exc) -> None:
        self.in_use = False
        self.release()

    def acquire(self) -> None:
        """Hold the lock: kept when held, else taken; RunLockedError when a live run holds it. A collective
        over the run's processes (call it on every one): only process 0 touches the file."""
        error = self._acquire() if self.main_process and self._fd is None else None
        if any_process(error is not None):  # every process of the run refuses together
            raise RunLockedError(error or f"{self.output_dir} is locked by another run (see process 0)")
        self.held = True

    def _acquire(self) -> str | None:
        """Take the lock; the refusal message when another live run holds it, else None."""
        import fcntl

        if "://" in str(self.output_dir) and not str(self.output_dir).startswith("file://"):
            if not self._warned:
                log.warning("%s is on an object store: no run lock is taken; start one run per directory",
                            self.output_dir)  # fmt: skip
            self._warned = True
            return None
        path = Path(str(self.output_dir).removeprefix("file://")) / LOCK_FILE
        # The directories this lock creates (deepest first): a set-up that fails removes them again.
        self._created = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
        path.parent.mkdir(parents=True, exist_ok=True)
        earlier = _HELD.get(str(path))
        if earlier is not None and earlier is not self and not earlier.in_use:
            log.info("%s: taken over from an earlier Trainer of this process, which is not training", path)
            earlier.release()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            who = (
                f"pid {holder.get('pid')} on {holder.get('host')} (started {holder.get('started')})"
                if holder
                else "another process"
            )
            return (
                f"{self.output_dir} is in use by another jdpo run: {who}. Wait for it to finish, stop "
                "it, or give this run another train.output_dir"
            )
        previous = _read(fd)
        if previous:
            same_host = previous.get("host") == socket.gethostname()
            state = "not running" if same_host and not _alive(int(previous.get("pid", 0))) else "exited"
            log.warning("%s: taking over the lock left by pid %s on %s (%s)", path, previous.get("pid"),
                        previous.get("host"), state)  # fmt: skip
        os.ftruncate(fd, 0)
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd, self._path = fd, path
        _HELD[str(path)] = self
        return None

    def abandon(self) -> None:
        """Release, and remove the lock file and the directories acquiring it created when nothing else
        was written there (a run refused at set-up leaves no stray output directory)."""
        path, created = getattr(self, "_path", None), getattr(self, "_created", [])
        self.release()
        if path is None or not created:
            return
        path.unlink(missing_ok=True)
        for d in created:
            try:
                d.rmdir()  # only when empty: anything else written there stays
            except OSError:
                return

    def release(self) -> None:
        """Drop the lock and clear its record (a clean exit leaves nothing to take over)."""
        import fcntl

        self.held = False
        if self._fd is None:
            return
        if _HELD.get(str(self._path)) is self:
            del _HELD[str(self._path)]
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _read(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0)
        return json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        return {}
