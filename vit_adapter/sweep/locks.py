"""The sweep's locks: flock(2) files under the study directory, through the `filelock` package (trial liveness,
the journal's turnstile, reference points), and a PostgreSQL advisory lock (the turnstile across machines)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .plan import Plan


class FileLock:
    """flock(2) on a file, through the `filelock` package (as `utils.locks.DirLock`). The kernel releases it when
    the holder dies, even by SIGKILL, which makes a free lock a liveness probe for the trial it guards. Local file
    systems only: where flock is missing (some NFS mounts) `filelock` falls back to a marker file, which a dead
    holder leaves behind.

    A second instance on the same path in the same process conflicts like another process would (a non-blocking
    probe of a trial this process runs fails); a blocking acquire of it from the same thread raises RuntimeError
    (`filelock`'s deadlock check) instead of hanging."""

    def __init__(self, path: Path) -> None:
        from filelock import UnixFileLock  # local: keep importing the sweep package cheap

        self.path = path
        self._lock = UnixFileLock(path, thread_local=False)

    @property
    def held(self) -> bool:
        return self._lock.is_locked

    def acquire(self, blocking: bool = True) -> bool:
        from filelock import Timeout

        if self.held:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=-1 if blocking else 0)
        except Timeout:
            return False
        return True

    def release(self) -> None:
        if self.held:
            self._lock.release()

    def close(self) -> None:
        self.release()


class AdvisoryLock:
    """A PostgreSQL session-level advisory lock: the turnstile of workers on several machines (a flock is
    machine-local). The server drops it when the holder's connection ends, so a worker that dies (even by
    SIGKILL: the kernel closes its socket) cannot leave it held; TCP keepalives cover a machine that vanishes."""

    def __init__(self, url: str, name: str) -> None:
        import sqlalchemy

        self.key = int.from_bytes(hashlib.sha256(f"vit-adapter-sweep:{name}".encode()).digest()[:8], "big", signed=True)
        keepalive = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}
        # AUTOCOMMIT: the lock is the session's, so this connection never sits "idle in transaction".
        self._engine = sqlalchemy.create_engine(
            url, poolclass=sqlalchemy.pool.NullPool, isolation_level="AUTOCOMMIT", connect_args=keepalive
        )
        self._conn: Any = None
        self._held = False

    @property
    def held(self) -> bool:
        return self._held

    def acquire(self, blocking: bool = True) -> bool:
        from sqlalchemy import text

        if self._held:
            return True
        if self._conn is None:
            self._conn = self._engine.connect()
        if blocking:
            self._conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
            self._held = True
        else:
            self._held = bool(self._conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key}).scalar())
        return self._held

    def release(self) -> None:
        from sqlalchemy import text

        if self._held:
            self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
            self._held = False

    def close(self) -> None:
        self.release()
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._engine.dispose()


def _trial_lock_path(plan: Plan, number: int) -> Path:
    return plan.study_dir / "locks" / f"trial_{number:05d}.lock"


@dataclass
class WorkerLocks:
    """A worker's two locks. The turnstile is held from "may I start a trial?" until that trial exists in the
    storage and holds its trial lock. The trial lock is held from then until Optuna has stored the trial's
    final state (released in the callback, which runs after `tell`), so no one sees it RUNNING and unlocked."""

    turnstile: FileLock | AdvisoryLock
    trial: FileLock | None = None

    def release_all(self) -> None:
        if self.trial is not None:
            self.trial.release()
            self.trial = None
        self.turnstile.release()
