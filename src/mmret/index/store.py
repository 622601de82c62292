"""The item store: one SQLite database holding every item's id, text, image path, metadata and
vector. It is the index's source of truth: each write is one transaction, so a crash leaves
the last committed state, and vector backends are rebuilt from it whenever they are stale.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from mmret.errors import IndexFormatError, InputError
from mmret.index.filters import Filter, to_sql

T = TypeVar("T")
_CHUNK = 900  # stays under SQLite's limit on bound parameters in one statement

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    key INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    text TEXT,
    image TEXT,
    metadata TEXT NOT NULL,
    vector BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS state (name TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT OR IGNORE INTO state VALUES ('generation', '0');
"""


@dataclass(frozen=True)
class StoredItem:
    """What the store keeps of an item besides its vector."""

    id: str
    text: str | None = None
    image: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def _chunks(values: Sequence[T]) -> Iterator[Sequence[T]]:
    for start in range(0, len(values), _CHUNK):
        yield values[start : start + _CHUNK]


class ItemStore:
    """Items keyed by an int64 ``key`` that only grows (SQLite AUTOINCREMENT): never reused."""

    def __init__(self, path: Path, dim: int, *, readonly: bool = False) -> None:
        self.path = path
        self.dim = dim
        if readonly and not path.is_file():
            raise IndexFormatError(f"{path}: item database is missing")
        uri = f"file:{path}?mode={'ro' if readonly else 'rwc'}"
        try:
            self._db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA busy_timeout = 10000")
            if not readonly:
                self._db.execute("PRAGMA journal_mode = WAL")
                self._db.execute("PRAGMA synchronous = FULL")
                self._db.executescript(_SCHEMA)
            self._db.execute("SELECT count(*) FROM items").fetchone()
        except sqlite3.DatabaseError as error:
            raise IndexFormatError(f"{path}: not a readable item database ({error})") from None

    def close(self) -> None:
        self._db.close()

    @property
    def generation(self) -> int:
        """Bumped by every committed write; backends record it to notice they are stale."""
        row = self._db.execute("SELECT value FROM state WHERE name = 'generation'").fetchone()
        return int(row[0])

    def __len__(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM items").fetchone()[0])

    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for chunk in _chunks(ids):
            query = f"SELECT id FROM items WHERE id IN ({','.join('?' * len(chunk))})"
            found.update(row[0] for row in self._db.execute(query, list(chunk)))
        return found

    def add(self, items: Sequence[StoredItem], vectors: np.ndarray) -> np.ndarray:
        """Insert items with their ``(N, dim)`` vectors in one transaction; returns their keys."""
        if vectors.shape != (len(items), self.dim):
            raise InputError(
                f"expected vectors of shape ({len(items)}, {self.dim}), got {vectors.shape}"
            )
        if not np.isfinite(vectors).all():
            raise InputError("vectors contain NaN or infinite values")
        keys = np.empty(len(items), dtype=np.int64)
        with self._transaction():
            for row, (item, vector) in enumerate(zip(items, vectors, strict=True)):
                cursor = self._db.execute(
                    "INSERT INTO items (id, text, image, metadata, vector) VALUES (?, ?, ?, ?, ?)",
                    (
                        item.id,
                        item.text,
                        item.image,
                        json.dumps(item.metadata, allow_nan=False),
                        np.ascontiguousarray(vector, dtype=np.float32).tobytes(),
                    ),
                )
                keys[row] = int(cursor.lastrowid or 0)
        return keys

    def remove(self, ids: Sequence[str]) -> np.ndarray:
        """Delete items by id in one transaction; returns the keys removed (unknown ids ignored)."""
        removed: list[int] = []
        with self._transaction():
            for chunk in _chunks(ids):
                marks = ",".join("?" * len(chunk))
                removed.extend(
                    row[0]
                    for row in self._db.execute(
                        f"SELECT key FROM items WHERE id IN ({marks})", chunk
                    )
                )
                self._db.execute(f"DELETE FROM items WHERE id IN ({marks})", list(chunk))
        return np.asarray(sorted(removed), dtype=np.int64)

    def rows(self, keys: Iterable[int]) -> dict[int, StoredItem]:
        wanted = [int(k) for k in keys]
        found: dict[int, StoredItem] = {}
        for chunk in _chunks(wanted):
            query = (
                "SELECT key, id, text, image, metadata FROM items "
                f"WHERE key IN ({','.join('?' * len(chunk))})"
            )
            for key, id_, text, image, metadata in self._db.execute(query, chunk):
                found[key] = StoredItem(id_, text, image, json.loads(metadata))
        return found

    def filter_keys(self, filter_: Filter) -> np.ndarray:
        """Sorted keys of the items whose metadata satisfies ``filter_``."""
        where, params = to_sql(filter_)
        rows = self._db.execute(f"SELECT key FROM items WHERE {where} ORDER BY key", params)
        return np.fromiter((row[0] for row in rows), dtype=np.int64)

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """All ``(N,)`` keys in ascending order and their ``(N, dim)`` vectors, one snapshot."""
        self._db.execute("BEGIN")  # count and rows must come from the same snapshot
        try:
            n = len(self)
            keys = np.empty(n, dtype=np.int64)
            vectors = np.empty((n, self.dim), dtype=np.float32)
            rows = self._db.execute("SELECT key, vector FROM items ORDER BY key")
            for row, (key, blob) in enumerate(rows):
                keys[row] = key
                vectors[row] = np.frombuffer(blob, dtype=np.float32)
        finally:
            self._db.execute("COMMIT")
        return keys, vectors

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (or rollback), bumping the generation on commit."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, error: object, trace: object) -> None:
        if kind is not None:
            self._db.execute("ROLLBACK")
            return
        self._db.execute(
            "UPDATE state SET value = CAST(value AS INTEGER) + 1 WHERE name = 'generation'"
        )
        self._db.execute("COMMIT")
