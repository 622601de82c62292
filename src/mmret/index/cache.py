"""Backend caches that open without being read: a data file memory-mapped on open, named by a
small record that is replaced atomically.

``<prefix>-cache.npz`` records the store's epoch and the generation the cache was saved at,
the name of its data file ``<prefix>-<token>.<suffix>``, and small arrays (keys). Saving
writes a data file under a new name, then the record naming it (each through a temporary file
and a rename), then removes the data files the record no longer names. So a reader that
mapped the old data file keeps reading it (POSIX keeps a removed file's pages while they are
mapped), and a crash at any point leaves the old record with its file or the new record with
its file; a data file orphaned by a crash is removed by the next save or by ``mmret repair``.
Caches are only caches: anything missing, unreadable or of another store reads as none.
"""

from __future__ import annotations

import io
import secrets
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmret._files import write_atomic, write_atomic_with

_ATTEMPTS = 3  # a writer may replace the files between reading the record and the data


@dataclass(frozen=True)
class LoadedCache:
    """A cache as saved: its generation, its data file (``None`` in a cache written before
    data files existed, which kept everything in the record) and the record's arrays."""

    generation: int
    data: Path | None
    arrays: dict[str, np.ndarray]


class CacheFiles:
    """The cache files of one backend kind in an index folder."""

    def __init__(self, folder: Path, prefix: str, suffix: str) -> None:
        self.folder, self.prefix, self.suffix = folder, prefix, suffix
        self.record = folder / f"{prefix}-cache.npz"

    def files(self) -> list[Path]:
        """The record and every data file, named by it or orphaned (all safe to delete)."""
        found = sorted(self.folder.glob(f"{self.prefix}-*.{self.suffix}"))
        return ([self.record] if self.record.is_file() else []) + found

    def save(
        self,
        epoch: str,
        generation: int,
        write_data: Callable[[Path], object],
        arrays: dict[str, np.ndarray],
    ) -> None:
        data = self.folder / f"{self.prefix}-{secrets.token_hex(6)}.{self.suffix}"
        write_atomic_with(data, write_data)
        record = _npz(
            epoch=np.str_(epoch), generation=np.int64(generation), data=np.str_(data.name), **arrays
        )
        write_atomic(self.record, record)
        for stale in self.folder.glob(f"{self.prefix}-*.{self.suffix}"):
            if stale != data:
                stale.unlink(missing_ok=True)

    def load(self, epoch: str, open_data: Callable[[Path], object]) -> tuple[LoadedCache, object]:
        """The cache saved for the store named ``epoch`` and what ``open_data`` made of its
        data file; raises :class:`CacheMissingError` when there is none usable."""
        for _ in range(_ATTEMPTS):
            try:
                with np.load(self.record, allow_pickle=False) as record:
                    arrays = {name: record[name] for name in record.files}
            except FileNotFoundError:
                raise CacheMissingError from None
            except (OSError, ValueError, KeyError, zipfile.BadZipFile):
                raise CacheMissingError from None  # a damaged cache: the caller rebuilds
            if str(arrays.pop("epoch", "")) != epoch or "generation" not in arrays:
                raise CacheMissingError
            generation = int(arrays.pop("generation"))
            if "data" not in arrays:
                return LoadedCache(generation, None, arrays), None
            data = self.folder / str(arrays.pop("data"))
            try:
                opened = open_data(data)
            except FileNotFoundError:
                continue  # replaced by a writer's save just now: read the new record
            except (OSError, ValueError, RuntimeError) as error:
                raise CacheMissingError from error
            return LoadedCache(generation, data, arrays), opened
        raise CacheMissingError


class CacheMissingError(Exception):
    """No usable cache: the backend is built from the item store instead."""


def _npz(**arrays: np.ndarray | np.generic) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()
