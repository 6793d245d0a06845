"""The lock that keeps the trial budget exact when several workers ask for trials at once.

A worker holds it from checking the budget until its new trial exists (RUNNING, so counted); without it,
two workers could both see one trial left and both start one.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from workbench.config import sqlalchemy_url
from workbench.study.spec import Spec
from workbench.study.storage import retried, sqlite_file

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection


class Lock(Protocol):
    def acquire(self) -> None: ...
    def release(self) -> None: ...  # does nothing when not held


def for_study(spec: Spec) -> Lock:
    """A lock all workers of the study share, on any machine that reaches the storage."""
    database = sqlite_file(spec.storage)
    if database is not None:
        return FileLock(database.with_name(database.name + ".lock"))
    return AdvisoryLock(spec.storage, spec.name)


class FileLock:
    """flock(2) on a file beside the SQLite database: every worker that can open the database sees it."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class AdvisoryLock:
    """A PostgreSQL session advisory lock, keyed by the study name, on a connection of its own."""

    def __init__(self, url: str, study_name: str):
        import sqlalchemy

        self.engine = sqlalchemy.create_engine(sqlalchemy_url(url), poolclass=sqlalchemy.pool.NullPool)
        self.key = int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:8], "big", signed=True)
        self._connection: Connection | None = None

    def acquire(self) -> None:
        retried(self._acquire)  # a server that is away is waited for, as the storage's calls wait

    def _acquire(self) -> None:
        import sqlalchemy

        self.release()
        self._connection = self.engine.connect()
        self._connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": self.key})

    def release(self) -> None:
        import sqlalchemy

        if self._connection is None:
            return
        try:
            self._connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
        except sqlalchemy.exc.OperationalError:
            pass  # the connection is gone, and with it the lock: the server ends a session's locks
        finally:
            self._connection.close()
            self._connection = None
