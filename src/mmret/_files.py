"""Writing files and folders so that a crash leaves the old version or the new one, never half."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def hash_file_stats(digest: Any, paths: Iterable[Path]) -> None:
    """Feed ``digest`` (a hashlib object) each file's path, size and modification time, in
    order: a cache key that changes whenever one of the files is replaced or edited."""
    for path in paths:
        stat = path.stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary sibling, flush it to disk, then rename it over ``path``."""
    write_atomic_with(path, lambda scratch: scratch.write_bytes(data))


def write_atomic_with(path: Path, write: Callable[[Path], object]) -> None:
    """Like :func:`write_atomic` for content that ``write`` puts in the file it is given (a
    large array or index streamed to disk rather than built in memory first)."""
    scratch = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(scratch)
        with scratch.open("rb") as handle:
            os.fsync(handle.fileno())
        scratch.replace(path)
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make a rename or a new file in ``folder`` durable (POSIX needs the folder synced too)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def replace_folder(folder: Path) -> Iterator[Path]:
    """Yield a scratch folder to fill; on success it replaces ``folder``, on error it is removed.

    For caches only: a crash between removing the old folder and renaming the new one leaves
    neither (the cache is then rebuilt); index folders use :func:`build_folder`.
    """
    scratch = folder.with_name(folder.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    scratch.rename(folder)


@contextmanager
def build_folder(folder: Path) -> Iterator[Path]:
    """Yield a hidden scratch folder to fill; on success it is renamed to ``folder`` (which must
    be absent or empty), so ``folder`` appears whole or not at all. Scratch folders that crashed
    processes left behind are removed on the next attempt."""
    for stale in folder.parent.glob(f".{folder.name}.building-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    scratch = folder.with_name(f".{folder.name}.building-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        yield scratch
        fsync_folder(scratch)
        scratch.rename(folder)  # rename(2) replaces an empty folder atomically
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    fsync_folder(folder.parent)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def default_cache_dir() -> Path:
    """Where tower features and embeddings are cached: ``$MMRET_CACHE/features``, by default
    ``~/.cache/mmret/features``."""
    return Path(os.environ.get("MMRET_CACHE", Path.home() / ".cache" / "mmret")) / "features"
