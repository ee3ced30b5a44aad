"""One `adakd sweep` process per sweep folder: an advisory lock on `<folder>/sweep.lock`.

The lock is the kernel's (`fcntl.flock`), so it dies with its process: a lock file left by a killed sweep holds no
lock and the next sweep takes it over without asking anyone to delete anything. The file's text (PID, host, start
time) is only there to tell the user who holds the folder. The cells a sweep starts do not inherit it (subprocesses
close inherited descriptors), so a cell outliving a killed sweep does not block the next one.
"""
from __future__ import annotations

import datetime
import errno
import os
import socket
import time
from pathlib import Path
from typing import Callable

from adakd.experiments.sweep import SweepError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, sweeps run unguarded
    fcntl = None

LOCK_NAME = "sweep.lock"


class SweepBusyError(SweepError):
    """Another live `adakd sweep` process holds the folder."""


class SweepLock:
    """Hold `<root>/sweep.lock` for the life of a `with` block; `wait=True` blocks until the holder ends."""

    def __init__(self, root: str | Path, wait: bool = False, poll_s: float = 1.0,
                 on_wait: Callable[[str], None] | None = None) -> None:
        self.path = Path(root) / LOCK_NAME
        self.wait = wait
        self.poll_s = poll_s
        self.on_wait = on_wait
        self.handle = None

    def holder(self) -> str:
        """Who holds the lock, as its file says ('PID 123 on host since 2026-12-03 12:00:00')."""
        try:
            text = self.path.read_text().strip()
        except OSError:
            return "another process"
        fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
        if not {"pid", "host", "since"} <= set(fields):
            return "another process"
        return f"PID {fields['pid']} on {fields['host']} since {fields['since'].replace('T', ' ')}"

    def __enter__(self) -> "SweepLock":
        if fcntl is None:  # pragma: no cover
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        told = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    handle.close()
                    raise
            if not self.wait:
                holder = self.holder()
                handle.close()
                raise SweepBusyError(f"sweep folder {str(self.path.parent)!r} is in use by {holder} (an `adakd sweep`"
                                     " still running there); wait for it to end, or add --wait to start when it does")
            if not told and self.on_wait is not None:
                self.on_wait(f"sweep folder {self.path.parent} is in use by {self.holder()}; waiting for it (--wait)")
                told = True
            time.sleep(self.poll_s)
        since = datetime.datetime.now().isoformat(timespec="seconds")
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid={os.getpid()} host={socket.gethostname()} since={since}\n")
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            # The file stays (removing it would race with a waiter that opened it); the kernel lock goes.
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None
