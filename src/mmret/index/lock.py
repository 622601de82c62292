"""One writer at a time: an exclusive advisory lock on ``writer.lock`` in the index folder.

The operating system drops the lock when its holder exits, even after ``kill -9``, so a crashed
writer never leaves a stale lock behind. Readers take no lock: SQLite gives them snapshots.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from mmret.errors import IndexBusyError, IndexFormatError

LOCK_FILE = "writer.lock"
_POLL_SECONDS = 0.05


class WriterLock:
    """Held from :meth:`acquire` until :meth:`release` (or the process ends)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, timeout: float) -> None:
        """Take the lock, waiting up to ``timeout`` seconds; :class:`IndexBusyError` after that."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise IndexFormatError(f"{self.path}: cannot open the writer lock ({error})") from None
        try:
            self._wait(fd, timeout)
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except BaseException:
            os.close(fd)  # closing drops the lock too, if it was taken
            raise
        self._fd = fd

    def _wait(self, fd: int, timeout: float) -> None:
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                    raise IndexBusyError(
                        f"{self.path.parent}: another writer (pid {holder}) has this index open; "
                        f"waited {timeout:g} s. Open it read-only to search, or try again later"
                    ) from None
                time.sleep(_POLL_SECONDS)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
