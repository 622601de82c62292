"""The item store: one SQLite database holding every item's id, text, image path, metadata and
vector. It is the index's source of truth: each write is one transaction, so a crash leaves
the last committed state, and vector backends are rebuilt from it whenever they are stale.

Vectors live in a table of their own, so fetching the rows of search hits reads small rows,
and in 16 KiB pages, which a 512-d vector fills to 88 % (with 4 KiB pages each 2 KiB vector
took a page of its own, doubling the file).

Besides the items, the ``state`` table records, in the same transactions as the writes:

* ``generation``: bumped by every committed write, so readers and caches notice changes;
* ``count`` and ``checksum``: the number of items and the XOR of one 64-bit digest per item
  (id, text, image, metadata and vector bytes), which ``mmret check`` recomputes to catch
  silent damage; XOR lets both writes and removals update it without rereading the table;
* ``manifest``: a copy of the folder's ``manifest.json``, so a lost manifest can be restored;
* ``epoch``: a random name for this database, new whenever it is rebuilt (``mmret repair``),
  so that caches and readers made from another database are never patched with its changes.

The ``removed`` table logs which key each write removed, so a reader or a cache that is a few
generations old catches up by applying the changes since (new keys are always larger than any
key before) instead of rereading every vector.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import sqlite3
from collections.abc import Generator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from mmret.errors import IndexFormatError, InputError, MmretError
from mmret.index.filters import Filter, json_path, to_sql

if TYPE_CHECKING:
    from mmret.index.token_store import TokenRef

T = TypeVar("T")
_JOINED = (
    "SELECT items.key, id, text, image, metadata, vector "
    "FROM items LEFT JOIN vectors ON vectors.key = items.key"
)
_CHUNK = 900  # stays under SQLite's limit on bound parameters in one statement
SQLITE_HEADER = b"SQLite format 3\x00"

# Run once, when the database is created.
_SCHEMA = """
CREATE TABLE items (
    key INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    text TEXT,
    image TEXT,
    metadata TEXT NOT NULL
);
CREATE TABLE vectors (key INTEGER PRIMARY KEY, vector BLOB NOT NULL);
CREATE TABLE state (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE removed (key INTEGER PRIMARY KEY, generation INTEGER NOT NULL);
CREATE INDEX removed_by_generation ON removed (generation);
INSERT INTO state VALUES ('generation', '0');
INSERT INTO state VALUES ('count', '0');
INSERT INTO state VALUES ('checksum', '0000000000000000');
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


def row_digest(id_: str, text: str | None, image: str | None, metadata: str, vector: bytes) -> int:
    """A 64-bit digest of one stored row, as it sits in the database."""
    digest = hashlib.blake2b(json.dumps([id_, text, image, metadata]).encode(), digest_size=8)
    digest.update(vector)
    return int.from_bytes(digest.digest(), "little")


def truncation(path: Path) -> str | None:
    """Why ``path`` is not a whole SQLite file (bad header, shorter than it says), or ``None``.

    Cheap: reads the 100-byte header only. SQLite itself would open such a file and fail later,
    on whichever query first touches a missing page.
    """
    try:
        with path.open("rb") as handle:
            header = handle.read(100)
            actual = os.fstat(handle.fileno()).st_size
        wal_size = path.with_name(path.name + "-wal").stat().st_size
    except FileNotFoundError:
        wal_size = 0  # no write-ahead log (or a writer just closed and removed it)
    except OSError as error:
        return f"cannot be read ({error})"
    if len(header) < 100 or not header.startswith(SQLITE_HEADER):
        return "not an SQLite database (bad header)"
    if wal_size or header[24:28] != header[92:96]:
        return None  # a checkpoint may be under way, or the size field is stale: trust SQLite
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    if actual < page_size * pages or actual % page_size:
        return f"truncated: {actual} bytes, but its header says {pages} pages of {page_size}"
    return None


class ItemStore:
    """Items keyed by an int64 ``key`` that only grows (SQLite AUTOINCREMENT): never reused.

    Every method reads one consistent state; group several reads into one snapshot with
    :meth:`snapshot`. Database errors surface as :class:`IndexFormatError` naming the file.
    """

    def __init__(
        self, path: Path, dim: int, *, readonly: bool = False, create: bool = False
    ) -> None:
        """Open the database at ``path``; only with ``create`` may it be missing (and made)."""
        self.path = path
        self.dim = dim
        self._depth = 0
        if create and path.exists():
            raise IndexFormatError(f"{path}: already exists")
        if not create:
            if not path.is_file():
                raise IndexFormatError(f"{path}: item database is missing (try `mmret repair`)")
            if why := truncation(path):
                raise IndexFormatError(f"{path}: {why} (try `mmret repair`)")
        uri = f"file:{path}?mode={'ro' if readonly else 'rwc' if create else 'rw'}"
        with self._errors():
            self._db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA busy_timeout = 10000")
            if not readonly:
                if create:
                    self._db.execute("PRAGMA page_size = 16384")  # before the first table
                self._db.execute("PRAGMA journal_mode = WAL")
                self._db.execute("PRAGMA synchronous = FULL")
            if create:
                self._db.executescript(_SCHEMA)
                epoch = secrets.token_hex(8)
                self._db.execute("INSERT INTO state VALUES ('epoch', ?)", (epoch,))
            self._db.execute("SELECT count(*) FROM items").fetchone()

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.IntegrityError as error:
            raise InputError(f"{self.path}: {error} (an id already in the index?)") from None
        except sqlite3.DatabaseError as error:
            if "full" in str(error):
                raise MmretError(f"{self.path}: {error}; nothing of this write was kept") from None
            raise IndexFormatError(
                f"{self.path}: {error} (run `mmret check` on the index folder)"
            ) from None

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Run the reads inside one read transaction: they all see the same committed state."""
        with self._errors():
            if self._depth == 0:
                self._db.execute("BEGIN")
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self._db.execute("COMMIT")

    def _state(self, name: str) -> str | None:
        with self._errors():
            row = self._db.execute("SELECT value FROM state WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])

    @property
    def generation(self) -> int:
        """Bumped by every committed write; backends record it to notice they are stale."""
        return int(self._state("generation") or 0)

    @property
    def epoch(self) -> str:
        """This database's random name: caches of another database do not apply to it."""
        return self._state("epoch") or ""

    @property
    def recorded_count(self) -> int:
        return int(self._state("count") or 0)

    @property
    def recorded_checksum(self) -> str:
        return self._state("checksum") or ""

    @property
    def manifest_copy(self) -> str | None:
        """The manifest JSON stored beside the items (``None`` if never recorded)."""
        return self._state("manifest")

    def record_manifest(self, text: str) -> None:
        with self._transaction():
            self._db.execute("INSERT OR REPLACE INTO state VALUES ('manifest', ?)", (text,))

    def __len__(self) -> int:
        with self._errors():
            return int(self._db.execute("SELECT count(*) FROM items").fetchone()[0])

    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        with self.snapshot():
            for chunk in _chunks(ids):
                query = f"SELECT id FROM items WHERE id IN ({','.join('?' * len(chunk))})"
                found.update(row[0] for row in self._db.execute(query, list(chunk)))
        return found

    def add(
        self,
        items: Sequence[StoredItem],
        vectors: np.ndarray,
        tokens: Sequence[TokenRef] | None = None,
    ) -> np.ndarray:
        """Insert items with their ``(N, dim)`` vectors in one transaction; returns their keys.

        ``tokens`` records where each item's token features lie (:mod:`mmret.index.token_store`)
        in the same transaction.
        """
        if vectors.shape != (len(items), self.dim):
            raise InputError(
                f"expected vectors of shape ({len(items)}, {self.dim}), got {vectors.shape}"
            )
        if not np.isfinite(vectors).all():
            raise InputError("vectors contain NaN or infinite values")
        keys = np.empty(len(items), dtype=np.int64)
        checksum = 0
        with self._transaction():
            for row, (item, vector) in enumerate(zip(items, vectors, strict=True)):
                metadata = json.dumps(item.metadata, allow_nan=False)
                blob = np.ascontiguousarray(vector, dtype=np.float32).tobytes()
                cursor = self._db.execute(
                    "INSERT INTO items (id, text, image, metadata) VALUES (?, ?, ?, ?)",
                    (item.id, item.text, item.image, metadata),
                )
                keys[row] = key = int(cursor.lastrowid or 0)
                self._db.execute("INSERT INTO vectors VALUES (?, ?)", (key, blob))
                if tokens is not None:
                    self._db.execute(
                        "INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?)", tokens[row].as_row(key)
                    )
                checksum ^= row_digest(item.id, item.text, item.image, metadata, blob)
            self._update_totals(len(items), checksum)
        return keys

    def remove(self, ids: Sequence[str]) -> np.ndarray:
        """Delete items by id in one transaction; returns the keys removed (unknown ids ignored)."""
        removed: list[int] = []
        checksum = 0
        with self._transaction():
            for chunk in _chunks(ids):
                marks = ",".join("?" * len(chunk))
                query = f"{_JOINED} WHERE id IN ({marks})"
                keys = []
                for key, *fields in self._db.execute(query, chunk):
                    keys.append(key)
                    checksum ^= row_digest(*fields)
                self._db.execute(f"DELETE FROM items WHERE id IN ({marks})", list(chunk))
                self._db.executemany("DELETE FROM vectors WHERE key = ?", [(k,) for k in keys])
                if self.has_tokens:
                    self._db.executemany("DELETE FROM tokens WHERE key = ?", [(k,) for k in keys])
                removed.extend(keys)
            generation = self.generation + 1  # the one this transaction commits
            self._db.executemany(
                "INSERT OR REPLACE INTO removed VALUES (?, ?)",
                [(key, generation) for key in removed],
            )
            self._update_totals(-len(removed), checksum)
        return np.asarray(sorted(removed), dtype=np.int64)

    @property
    def has_tokens(self) -> bool:
        """Whether the store has a ``tokens`` table (an index with token features)."""
        with self._errors():
            query = "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'tokens'"
            return bool(self._db.execute(query).fetchone()[0])

    def create_tokens_table(self) -> None:
        from mmret.index.token_store import TABLE

        with self._transaction():
            self._db.execute(TABLE)

    def token_refs(self, keys: Iterable[int] | None = None) -> dict[int, TokenRef]:
        """Where the token features of ``keys`` (default: every item) lie; items without
        recorded features are absent."""
        from mmret.index.token_store import TokenRef

        found: dict[int, TokenRef] = {}
        with self.snapshot():
            if keys is None:
                rows = self._db.execute("SELECT * FROM tokens ORDER BY key").fetchall()
            else:
                rows = []
                for chunk in _chunks([int(k) for k in keys]):
                    marks = ",".join("?" * len(chunk))
                    rows += self._db.execute(
                        f"SELECT * FROM tokens WHERE key IN ({marks})", chunk
                    ).fetchall()
        for key, *fields in rows:
            found[key] = TokenRef(*fields)
        return found

    def set_token_refs(self, refs: dict[int, TokenRef]) -> None:
        """Record (or replace) where items' token features lie, in one transaction (repair)."""
        with self._transaction():
            self._db.executemany(
                "INSERT OR REPLACE INTO tokens VALUES (?, ?, ?, ?, ?, ?)",
                [ref.as_row(key) for key, ref in refs.items()],
            )
            self._db.execute("DELETE FROM tokens WHERE key NOT IN (SELECT key FROM items)")

    def _update_totals(self, delta: int, checksum: int) -> None:
        old = int(self._state("checksum") or "0", 16)
        self._db.execute(
            "UPDATE state SET value = CAST(value AS INTEGER) + ? WHERE name = 'count'", (delta,)
        )
        self._db.execute(
            "UPDATE state SET value = ? WHERE name = 'checksum'", (f"{old ^ checksum:016x}",)
        )

    def rows(self, keys: Iterable[int]) -> dict[int, StoredItem]:
        wanted = [int(k) for k in keys]
        found: dict[int, StoredItem] = {}
        with self.snapshot():
            for chunk in _chunks(wanted):
                query = (
                    "SELECT key, id, text, image, metadata FROM items "
                    f"WHERE key IN ({','.join('?' * len(chunk))})"
                )
                for key, id_, text, image, metadata in self._db.execute(query, chunk):
                    parsed = {} if metadata == "{}" else json.loads(metadata)
                    found[key] = StoredItem(id_, text, image, parsed)
        return found

    def lookup(self, ids: Sequence[str]) -> dict[str, tuple[StoredItem, np.ndarray]]:
        """The stored rows of those ``ids`` that exist, each with its ``(dim,)`` vector."""
        found: dict[str, tuple[StoredItem, np.ndarray]] = {}
        with self.snapshot():
            for chunk in _chunks(list(ids)):
                query = f"{_JOINED} WHERE id IN ({','.join('?' * len(chunk))})"
                for _, id_, text, image, metadata, vector in self._db.execute(query, list(chunk)):
                    if vector is None or len(vector) != self.dim * 4:
                        raise IndexFormatError(f"{self.path}: item {id_!r} has no valid vector")
                    row = StoredItem(id_, text, image, json.loads(metadata))
                    found[id_] = (row, np.frombuffer(vector, dtype=np.float32).copy())
        return found

    def vectors_of(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        """The ``(dim,)`` stored vector of each of ``ids`` that is present."""
        return {id_: vector for id_, (_, vector) in self.lookup(ids).items()}

    def filter_keys(self, filter_: Filter) -> np.ndarray:
        """Sorted keys of the items whose metadata satisfies ``filter_``."""
        where, params = to_sql(filter_)
        with self._errors():
            rows = self._db.execute(f"SELECT key FROM items WHERE {where} ORDER BY key", params)
            return np.fromiter((row[0] for row in rows), dtype=np.int64)

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """All ``(N,)`` keys in ascending order and their ``(N, dim)`` vectors, one snapshot."""
        with self.snapshot():
            rows = self._db.execute("SELECT key, vector FROM vectors ORDER BY key").fetchall()
            if len(rows) != len(self):
                raise IndexFormatError(f"{self.path}: items and vectors do not match")
        return self._unpack(rows)

    def vector_chunks(self, size: int = 1 << 18) -> Generator[tuple[np.ndarray, np.ndarray]]:
        """:meth:`vectors` a chunk of at most ``size`` rows at a time, ascending, one snapshot
        (a collection larger than memory is never all read at once)."""
        with self.snapshot():
            if (count := self._db.execute("SELECT count(*) FROM vectors").fetchone()[0]) != len(
                self
            ):
                raise IndexFormatError(f"{self.path}: items and vectors do not match ({count})")
            after = -1
            while True:
                rows = self._db.execute(
                    "SELECT key, vector FROM vectors WHERE key > ? ORDER BY key LIMIT ?",
                    (after, size),
                ).fetchall()
                if not rows:
                    return
                after = rows[-1][0]
                yield self._unpack(rows)

    def vectors_at(self, keys: np.ndarray) -> np.ndarray:
        """The ``(M, dim)`` stored vectors of ``(M,)`` keys, in their order: only those rows are
        read (exact re-scoring of compressed candidates). Call inside a :meth:`snapshot` that
        the keys came from; a missing key is damage."""
        wanted = [int(key) for key in keys]
        found: dict[int, bytes] = {}
        with self._errors():
            for chunk in _chunks(wanted):
                query = (
                    f"SELECT key, vector FROM vectors WHERE key IN ({','.join('?' * len(chunk))})"
                )
                found.update(self._db.execute(query, chunk).fetchall())
        if len(found) != len(set(wanted)):
            missing = sorted(set(wanted) - set(found))[:3]
            raise IndexFormatError(f"{self.path}: no stored vector for keys {missing} (run check)")
        blob = b"".join(found[key] for key in wanted)
        if len(blob) != len(wanted) * self.dim * 4:
            raise IndexFormatError(f"{self.path}: stored vectors do not have {self.dim} dimensions")
        return np.frombuffer(blob, dtype=np.float32).reshape(len(wanted), self.dim)

    def changes_since(
        self, generation: int, last_key: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What changed after ``generation`` for a copy whose largest key is ``last_key``:
        ``(N,)`` added keys, their ``(N, dim)`` vectors, and the ``(M,)`` keys removed."""
        with self.snapshot():
            rows = self._db.execute(
                "SELECT key, vector FROM vectors WHERE key > ? ORDER BY key", (last_key,)
            ).fetchall()
            removed = self.removed_since(generation)
        keys, vectors = self._unpack(rows)
        return keys, vectors, removed

    def removed_since(self, generation: int) -> np.ndarray:
        """Sorted keys that writes after ``generation`` removed."""
        with self._errors():
            rows = self._db.execute(
                "SELECT key FROM removed WHERE generation > ? ORDER BY key", (generation,)
            ).fetchall()
        return np.asarray([row[0] for row in rows], dtype=np.int64)

    def metadata_values(self, key: str, after: int) -> tuple[np.ndarray, list[Any]]:
        """Sorted ``(N,)`` keys above ``after`` and each item's value of metadata ``key`` as
        SQLite's ``json_extract`` reads it: int, float, str (objects and arrays as JSON text)
        or ``None`` where absent or null."""
        with self._errors():
            rows = self._db.execute(
                "SELECT key, json_extract(metadata, ?) FROM items WHERE key > ? ORDER BY key",
                (json_path(key), after),
            ).fetchall()
        keys = np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))
        return keys, [row[1] for row in rows]

    def _unpack(self, rows: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        keys = np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))
        blob = b"".join(row[1] for row in rows)
        if len(blob) != len(rows) * self.dim * 4:
            raise IndexFormatError(f"{self.path}: stored vectors do not have {self.dim} dimensions")
        return keys, np.frombuffer(blob, dtype=np.float32).reshape(len(rows), self.dim).copy()

    def scan(self) -> Iterator[tuple[int, str, str | None, str | None, str, bytes | None]]:
        """Every raw row ``(key, id, text, image, metadata JSON, vector bytes)``, by key
        (the vector ``None`` if it is missing)."""
        with self.snapshot():
            yield from self._db.execute(f"{_JOINED} ORDER BY items.key")

    def stray_vectors(self) -> int:
        """How many vectors belong to no item (a sound store has none)."""
        with self._errors():
            query = "SELECT count(*) FROM vectors WHERE key NOT IN (SELECT key FROM items)"
            return int(self._db.execute(query).fetchone()[0])

    def integrity_errors(self) -> list[str]:
        """SQLite's own structural check of every page and index (empty when sound)."""
        with self._errors():
            rows = self._db.execute("PRAGMA integrity_check").fetchall()
        return [] if rows == [("ok",)] else [str(row[0]) for row in rows]

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``, bumping the generation; any error rolls back."""
        with self._errors():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._db.execute(
                    "UPDATE state SET value = CAST(value AS INTEGER) + 1 WHERE name = 'generation'"
                )
                self._db.execute("COMMIT")
            except BaseException:
                # SQLite may have rolled back already (a full disk): only end what is open,
                # and let the error under way be the one reported.
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise
