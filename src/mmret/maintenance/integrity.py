"""Verifying an index folder (``mmret check``) and restoring what can be (``mmret repair``).

An index folder's truth is ``items.sqlite``; ``manifest.json`` describes it (and a copy of it
lives inside the database); backend files such as ``faiss-cache.npz`` are caches, rebuilt
whenever they are stale or unreadable. So:

* a damaged manifest is restored from the database's copy;
* a damaged database is salvaged row by row into a fresh one: every row SQLite can still read
  and whose vector is whole is kept, the damaged files are moved to ``damaged-<time>/``;
* caches and files left by interrupted writes are dropped and rebuilt;
* token features kept for reranking that are missing or damaged are computed again from the
  items' images and texts (:mod:`mmret.maintenance.tokens`).
"""

from __future__ import annotations

import itertools
import json
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmret._files import fsync_folder, write_atomic
from mmret.encoders.base import Encoder
from mmret.errors import IndexFormatError, MmretError
from mmret.index.base import INDEXES, new_backend
from mmret.index.lock import WriterLock
from mmret.index.manifest import (
    ITEMS_FILE,
    MANIFEST_FILE,
    IndexManifest,
    manifest_text,
    parse_manifest,
    read_manifest,
)
from mmret.index.store import ItemStore, StoredItem, row_digest
from mmret.maintenance.report import CheckReport
from mmret.maintenance.tokens import check_tokens, repair_tokens

SALVAGED = f"{ITEMS_FILE}.salvaged"
_SALVAGE_RANGE = 1000
_GIVE_UP = 20  # ranges in a row with nothing readable, when the largest key is unknown
_SHOWN = 5


def _store_manifest(folder: Path) -> IndexManifest | None:
    """The manifest copy kept inside ``items.sqlite``, if it can be read."""
    try:
        store = ItemStore(folder / ITEMS_FILE, 0, readonly=True)
    except IndexFormatError:
        return None
    try:
        text = store.manifest_copy
    except IndexFormatError:
        return None
    finally:
        store.close()
    if text is None:
        return None
    try:
        return parse_manifest(text.encode(), folder / ITEMS_FILE)
    except IndexFormatError:
        return None


def check_index(folder: str | Path) -> CheckReport:
    """Verify every file of an index folder without changing anything."""
    folder = Path(folder)
    report = CheckReport(str(folder))
    if not folder.is_dir():
        report.problem("manifest", f"{folder}: no such index folder")
        return report
    try:
        manifest: IndexManifest | None = read_manifest(folder)
    except IndexFormatError as error:
        report.problem("manifest", str(error))
        manifest = _store_manifest(folder)
    for leftover in sorted(folder.glob("*.tmp")):
        report.notices.append(f"{leftover.name}: left by an interrupted write (repair removes it)")
    if (folder / SALVAGED).is_file():
        report.problem("items", f"{folder / SALVAGED}: an interrupted repair (run it again)")
    if manifest is None:
        report.problem("items", f"{folder / ITEMS_FILE}: no readable manifest to check it against")
        return report
    try:
        store = ItemStore(folder / ITEMS_FILE, manifest.dim, readonly=True)
    except IndexFormatError as error:
        report.problem("items", str(error))
        return report
    try:
        with store.snapshot():
            keys = _check_store(store, manifest, report)
            _check_backend(store, manifest, folder, report, keys)
            if manifest.token_features is not None:
                check_tokens(store, manifest, folder, report, keys)
    except IndexFormatError as error:
        report.problem("items", str(error))
    finally:
        store.close()
    return report


def vector_problem(vector: bytes, dim: int) -> str | None:
    """What is wrong with a stored vector's bytes for a ``dim``-dimensional index, if anything."""
    if len(vector) != 4 * dim:
        return f"vector of {len(vector)} bytes, not {4 * dim}"
    if not np.isfinite(np.frombuffer(vector, dtype=np.float32)).all():
        return "vector holds NaN or infinite values"
    return None


def _check_store(store: ItemStore, manifest: IndexManifest, report: CheckReport) -> np.ndarray:
    """Checks the database; returns the keys of its items."""
    name = store.path
    for line in store.integrity_errors()[:_SHOWN]:
        report.problem("items", f"{name}: {line}")
    count, checksum, bad, keys = 0, 0, [], []
    for key, id_, text, image, metadata, vector in store.scan():
        count += 1
        keys.append(key)
        if vector is None:
            bad.append(f"row {key}: its vector is missing")
            continue
        checksum ^= row_digest(id_, text, image, metadata, vector)
        if why := vector_problem(vector, manifest.dim):
            bad.append(f"row {key}: {why}")
    report.items = count
    for line in bad[:_SHOWN]:
        report.problem("items", f"{name}: {line}")
    if stray := store.stray_vectors():
        report.problem("items", f"{name}: {stray} vectors belong to no item")
    if store.recorded_count != count:
        report.problem("items", f"{name}: holds {count} items, but {store.recorded_count} recorded")
    if store.recorded_checksum != f"{checksum:016x}":
        report.problem("items", f"{name}: content checksum mismatch (rows damaged or altered)")
    if store.manifest_copy is None:
        report.notices.append(f"{name}: holds no copy of the manifest (repair records one)")
    elif store.manifest_copy != manifest_text(manifest):
        report.problem("manifest", f"{name}: its copy of the manifest differs from {MANIFEST_FILE}")
    return np.asarray(keys, dtype=np.int64)


def _check_backend(
    store: ItemStore, manifest: IndexManifest, folder: Path, report: CheckReport, keys: np.ndarray
) -> None:
    try:
        backend = new_backend(
            manifest.backend,
            manifest.backend_options,
            manifest.dim,
            report.items,
            manifest.token_dim,
        )
    except (TypeError, MmretError) as error:
        report.problem("manifest", f"{folder / MANIFEST_FILE}: unusable backend ({error})")
        return
    backend.use_stored_vectors(store.vectors_at)
    try:
        if backend.load(folder, store.epoch) == store.generation:
            if len(backend) != report.items:
                report.problem(
                    "cache",
                    f"{folder}: the {backend.name} cache holds {len(backend)} vectors, "
                    f"not {report.items} (repair rebuilds it)",
                )
            elif not np.array_equal(backend.stored_keys(), keys):
                report.problem(
                    "cache",
                    f"{folder}: the {backend.name} cache holds other items than {ITEMS_FILE} "
                    "(repair rebuilds it)",
                )
        elif backend.cache_files(folder):
            report.notices.append(
                f"{folder}: the {backend.name} cache is stale or unreadable; it is updated from "
                f"{ITEMS_FILE} on open"
            )
    finally:
        backend.close()


@dataclass
class RepairReport:
    """What ``repair_index`` did, and how many items the index holds afterwards."""

    folder: str
    actions: list[str] = field(default_factory=list)
    items: int = 0
    lost: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def repair_index(
    folder: str | Path, *, wait: float = 0.0, encoder: Encoder | None = None
) -> RepairReport:
    """Restore a damaged index folder as far as its files allow; see the module docstring.

    Takes the writer lock, so it never runs beside a writer. Readers should reopen afterwards.
    Token features that are missing or damaged are computed again from the items' images and
    texts by ``encoder`` (default: the backbone the index records).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise IndexFormatError(f"{folder}: no such index folder")
    lock = WriterLock(folder)
    lock.acquire(wait)
    try:
        return _repair(folder, encoder)
    finally:
        lock.release()


def _repair(folder: Path, encoder: Encoder | None) -> RepairReport:
    report = RepairReport(str(folder))
    for leftover in sorted(folder.glob("*.tmp")):
        leftover.unlink()
        report.actions.append(f"removed {leftover.name}, left by an interrupted write")
    if (folder / SALVAGED).is_file():
        aside = _finish_swap(folder)
        report.actions.append(
            f"finished an interrupted repair: put {SALVAGED} in place (old files in {aside}/)"
        )
    manifest = _repair_manifest(folder, report)
    before = check_index(folder)
    store_damaged = "items" in before.damaged
    if store_damaged:
        _salvage(folder, manifest, report)
    store = ItemStore(folder / ITEMS_FILE, manifest.dim)
    try:
        if store.manifest_copy != manifest_text(manifest):
            store.record_manifest(manifest_text(manifest))
            report.actions.append(f"recorded a copy of the manifest in {ITEMS_FILE}")
        report.items = len(store)
    finally:
        store.close()
    if manifest.token_features is not None and ("tokens" in before.damaged or store_damaged):
        repair_tokens(folder, manifest, report.actions, encoder)
    if "cache" in before.damaged or store_damaged:
        for name in INDEXES:  # whichever backend wrote it: "auto" may have used either
            for cache in INDEXES.get(name)(manifest.dim).cache_files(folder):
                cache.unlink()
                report.actions.append(f"removed {cache.name} (rebuilt from {ITEMS_FILE} on open)")
    if not report.actions:
        report.actions.append("nothing to repair")
    return report


def _repair_manifest(folder: Path, report: RepairReport) -> IndexManifest:
    try:
        return read_manifest(folder)
    except IndexFormatError as error:
        copy = _store_manifest(folder)
        if copy is None:
            raise IndexFormatError(
                f"{error}; and {folder / ITEMS_FILE} holds no readable copy to restore it from"
            ) from None
    write_atomic(folder / MANIFEST_FILE, manifest_text(copy).encode())
    report.actions.append(f"restored {MANIFEST_FILE} from the copy in {ITEMS_FILE}")
    return copy


def _salvage(folder: Path, manifest: IndexManifest, report: RepairReport) -> None:
    """Copy every readable, whole row into a fresh database and put it in place.

    The fresh database is built as ``items.sqlite.salvaging`` and renamed ``.salvaged`` once
    complete; then the damaged files are moved aside and it is renamed into place. A crash at
    any point leaves either the damaged database in place (and repair starts over) or a
    complete ``.salvaged`` file, which the next repair puts in place (:func:`_finish_swap`).
    """
    damaged = folder / ITEMS_FILE
    building = folder / f"{ITEMS_FILE}.salvaging"
    for suffix in ("", "-wal", "-shm"):
        building.with_name(building.name + suffix).unlink(missing_ok=True)
    fresh = ItemStore(building, manifest.dim, create=True)
    kept = seen = 0
    try:
        batch: list[tuple[StoredItem, bytes]] = []
        for row in _readable_rows(damaged):
            seen += 1
            if vector_problem(row[1], manifest.dim):
                continue
            batch.append(row)
            if len(batch) >= _SALVAGE_RANGE:
                kept += _store_rows(fresh, batch)
                batch = []
        kept += _store_rows(fresh, batch)
        fresh.record_manifest(manifest_text(manifest))
    finally:
        fresh.close()  # checkpoints its log into the file: the file alone is complete
    recorded = _recorded_count(damaged)
    building.rename(folder / SALVAGED)
    fsync_folder(folder)
    aside = _finish_swap(folder)
    report.lost = max(recorded or 0, seen) - kept
    report.actions.append(
        f"salvaged {kept} items from the damaged {ITEMS_FILE} into a new one "
        f"({report.lost} lost to the damage); the damaged files are in {aside}/"
    )


def _finish_swap(folder: Path) -> str:
    """Move whatever ``items.sqlite*`` files exist aside and put the complete salvaged
    database in their place; returns the name of the folder they went to."""
    aside = Path(tempfile.mkdtemp(prefix=f"damaged-{time.strftime('%Y%m%d-%H%M%S')}-", dir=folder))
    # The log goes first: replayed into the new database, it would corrupt it.
    for suffix in ("-wal", "-shm", ""):
        part = folder / (ITEMS_FILE + suffix)
        if part.exists():
            part.rename(aside / part.name)
    fsync_folder(aside)
    (folder / SALVAGED).rename(folder / ITEMS_FILE)
    fsync_folder(folder)
    return aside.name


def _store_rows(store: ItemStore, rows: list[tuple[StoredItem, bytes]]) -> int:
    if rows:
        vectors = np.stack([np.frombuffer(vector, dtype=np.float32) for _, vector in rows])
        store.add([item for item, _ in rows], vectors)
    return len(rows)


def _readable_rows(path: Path) -> Iterator[tuple[StoredItem, bytes]]:
    """Rows of a possibly damaged database: whole ranges of keys where they read, else one by
    one, skipping what SQLite cannot read."""
    try:
        db = _open_damaged(path)
    except sqlite3.DatabaseError:
        return
    query = (
        "SELECT id, text, image, metadata, vector FROM items JOIN vectors USING (key) "
        "WHERE key BETWEEN ? AND ?"
    )
    top = _top_key(db)
    misses = 0
    try:
        for start in itertools.count(1, _SALVAGE_RANGE):
            if (top is not None and start > top) or (top is None and misses >= _GIVE_UP):
                break
            rows = _read_range(db, query, start, start + _SALVAGE_RANGE - 1)
            misses = 0 if rows else misses + 1
            for id_, text, image, metadata, vector in rows:
                try:
                    parsed = json.loads(metadata)
                except (TypeError, json.JSONDecodeError):
                    continue
                if isinstance(id_, str) and isinstance(vector, bytes):
                    yield StoredItem(id_, text, image, parsed), vector
    finally:
        db.close()


def _open_damaged(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    # Without it SQLite refuses a file shorter than its header says before reading any page.
    db.execute("PRAGMA writable_schema = ON")
    return db


def _recorded_count(path: Path) -> int | None:
    try:
        db = _open_damaged(path)
        try:
            row = db.execute("SELECT value FROM state WHERE name = 'count'").fetchone()
        finally:
            db.close()
    except sqlite3.DatabaseError:
        return None
    return int(row[0]) if row else None


def _top_key(db: sqlite3.Connection) -> int | None:
    """The largest key ever given out, if the damage left a way to know it."""
    for query in (
        "SELECT seq FROM sqlite_sequence WHERE name = 'items'",
        "SELECT max(key) FROM items",
    ):
        try:
            row = db.execute(query).fetchone()
        except sqlite3.DatabaseError:
            continue
        if row is not None and row[0] is not None:
            return int(row[0])
    return None


def _read_range(db: sqlite3.Connection, query: str, start: int, end: int) -> list[Any]:
    try:
        return db.execute(query, (start, end)).fetchall()
    except sqlite3.DatabaseError:
        pass
    rows: list[Any] = []
    for key in range(start, end + 1):
        try:
            rows += db.execute(query, (key, key)).fetchall()
        except sqlite3.DatabaseError:
            continue
    return rows
