"""One writer per directory: an exclusive, non-blocking flock(2) beside it, through the `filelock` package.

The kernel drops the lock when its holder dies (even by SIGKILL), so a lock never goes stale; the holder writes its
PID into the file so that a second writer can name it. Run directories (``engine.rundir``) and generated datasets
(``data.synth``) both take it, which is why it lives here, below both.
"""

from __future__ import annotations

import os
from contextlib import suppress
from pathlib import Path
from typing import Any


class DirectoryInUseError(RuntimeError):
    """Another process holds the directory's lock; the message names its PID."""


def lock_path(target: str | Path) -> Path:
    """The lock file of a run or dataset directory: hidden, beside it (inside it would move on rename)."""
    target = Path(target)
    return target.with_name(f".{target.name}.lock")


def _write_pid(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)


class DirLock:
    """Exclusive, non-blocking lock of one directory; `acquire` raises DirectoryInUseError naming the holder's PID."""

    def __init__(self, target: str | Path, what: str) -> None:
        self.path = lock_path(target)
        self.what = what
        self._lock: Any = None

    def acquire(self) -> DirLock:
        from filelock import FileLock, Timeout  # local: keep importing this module cheap

        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.path, timeout=0, thread_local=False, on_acquired=_write_pid)
        try:
            lock.acquire()
        except Timeout:
            try:
                holder = self.path.read_text(encoding="ascii").strip() or "unknown"
            except OSError:
                holder = "unknown"
            raise DirectoryInUseError(
                f"{self.what} is in use by another writer (PID {holder}); wait for it to finish or stop it"
            ) from None
        self._lock = lock
        return self

    def release(self) -> None:
        """Remove the lock file, then unlock (filelock re-checks the inode, so a waiter never holds a stale one)."""
        if self._lock is None:
            return
        with suppress(OSError):
            self.path.unlink()
        self._lock.release()
        self._lock = None

    @property
    def held(self) -> bool:
        return self._lock is not None
