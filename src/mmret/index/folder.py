"""An index folder opened: its manifest, item store, writer lock, vector backend, metadata
columns and token files, kept consistent with each other and with other processes' writes.

It knows nothing of encoders: it stores and searches vectors made elsewhere. The
:class:`~mmret.engine.Retriever` adds encoding and the search steps on top; a RECO memory
(:mod:`mmret.memory.store`) holds two of these over its own vectors.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mmret._closing import Closing
from mmret._files import build_folder
from mmret.errors import IndexFormatError, InputError
from mmret.index.base import VectorIndex, new_backend
from mmret.index.columns import MetadataColumns
from mmret.index.filters import Filter
from mmret.index.lock import WriterLock
from mmret.index.manifest import (
    ITEMS_FILE,
    IndexManifest,
    manifest_text,
    read_manifest,
    write_manifest,
)
from mmret.index.store import ItemStore, StoredItem
from mmret.index.token_store import TokenFiles
from mmret.items import Item, SearchResult
from mmret.late_interaction import normalise_tokens
from mmret.reranker import TokenFeatureSpec

if TYPE_CHECKING:
    from mmret.heads.cross_encoder import SideTokens

#: A hit with the item's store key: ``(key, result)``.
KeyedHit = tuple[int, SearchResult]


def refuse_existing(folder: Path) -> Path:
    """``folder``, if nothing is there yet (or an empty folder): a new index goes there."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise InputError(f"{folder}: already exists and is not empty")
    return folder


class IndexFolder(Closing):
    """One index folder opened for reading (and, unless ``readonly``, writing).

    Calls from several threads take turns (one SQLite connection serves them all); any
    number of processes may read while one writes.
    """

    def __init__(
        self, folder: Path, manifest: IndexManifest, store: ItemStore, lock: WriterLock | None
    ) -> None:
        self.folder = folder
        self.manifest = manifest
        self.readonly = lock is None
        self.store = store
        self._writer_lock = lock
        # One connection serves every thread: calls take turns so transactions never mix.
        self.mutex = threading.RLock()
        self._columns = MetadataColumns()
        stored = manifest.token_features
        #: The token features stored beside the items for reranking, if any.
        self.token_spec = None if stored is None else TokenFeatureSpec.from_dict(stored)
        self.tokens = None if self.token_spec is None else TokenFiles(folder, self.token_spec)
        self.backend, self._generation = self._load_backend()

    @staticmethod
    def create(folder: Path, manifest: IndexManifest) -> None:
        """Write an empty index folder (built aside and renamed into place, so a crash leaves
        no half-made index)."""
        refuse_existing(folder)
        try:  # fail on a bad backend or option before creating anything
            new_backend(
                manifest.backend, manifest.backend_options, manifest.dim, 0, manifest.token_dim
            )
        except TypeError as error:
            raise InputError(f"backend {manifest.backend!r}: bad options ({error})") from None
        folder.parent.mkdir(parents=True, exist_ok=True)
        with build_folder(folder) as scratch:
            store = ItemStore(scratch / ITEMS_FILE, manifest.dim, create=True)
            store.record_manifest(manifest_text(manifest))
            if manifest.token_features is not None:
                store.create_tokens_table()
            store.close()
            write_manifest(scratch, manifest)

    @classmethod
    def open(
        cls,
        folder: Path,
        *,
        readonly: bool = False,
        wait: float = 10.0,
        manifest: IndexManifest | None = None,
    ) -> IndexFolder:
        """Open an existing folder; a writer waits up to ``wait`` seconds for another.
        ``manifest``: the folder's, if the caller has read it already."""
        manifest = manifest or read_manifest(folder)
        lock = None
        if not readonly:
            lock = WriterLock(folder)
            lock.acquire(wait)
        store = None
        try:
            store = ItemStore(folder / ITEMS_FILE, manifest.dim, readonly=readonly)
            return cls(folder, manifest, store, lock)
        except BaseException:
            if store is not None:
                store.close()
            if lock is not None:
                lock.release()
            raise

    def close(self) -> None:
        """Save the backend's cache if writes made it stale, and release the folder."""
        with self.mutex:
            try:
                if self._writer_lock is not None:
                    self.flush()
            finally:
                self.store.close()
                self.backend.close()
                if self._writer_lock is not None:
                    self._writer_lock.release()
                    self._writer_lock = None

    def __len__(self) -> int:
        with self.mutex:
            return len(self.store)

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """One consistent view: what is read inside agrees even while another process writes."""
        with self.mutex, self.store.snapshot():
            yield

    # -- the backend ------------------------------------------------------------------------

    def _load_backend(self) -> tuple[VectorIndex, int]:
        """The vector backend for the store's current state, and that state's generation.

        A cache saved a few writes ago is brought up to date with the changes since, rather
        than rebuilt: after a crash, or in a reader while a writer adds, opening stays cheap.
        """
        with self.store.snapshot():
            generation, epoch = self.store.generation, self.store.epoch
            count = self.store.recorded_count  # counting the rows would read the table
            backend = self._new_backend(count)
            cached = backend.load(self.folder, epoch)
            if cached is not None and cached <= generation:
                self._catch_up(backend, cached)
                if len(backend) != count:
                    # The cache lost entries its record stands for (Milvus Lite killed while
                    # writing can lose rows it had acknowledged): rebuilt from the store.
                    backend.close()
                    backend, cached = self._new_backend(count), None
            if cached is None or cached > generation:
                with contextlib.closing(self.store.vector_chunks()) as chunks:  # ends its read
                    backend.build(chunks, count)
                cached = -1
            elif backend.cache_outdated:
                cached = -1  # a writer's flush saves it in the current layout
        self._epoch = epoch
        self._saved_generation = cached  # what the cache file holds: flush() rewrites it
        return backend, generation

    def _new_backend(self, count: int) -> VectorIndex:
        """An empty backend of the manifest's kind, sized for ``count`` items, reading the
        store's vectors."""
        manifest = self.manifest
        backend = new_backend(
            manifest.backend, manifest.backend_options, manifest.dim, count, manifest.token_dim
        )
        backend.use_stored_vectors(self.store.vectors_at)
        return backend

    def _catch_up(self, backend: VectorIndex, since: int) -> None:
        keys, vectors, removed = self.store.changes_since(since, backend.last_key)
        backend.remove(removed)
        backend.add(keys, vectors)

    def _current_backend(self) -> VectorIndex:
        """Inside a store snapshot: the backend, updated if another process wrote since."""
        generation = self.store.generation
        if generation != self._generation:
            self._catch_up(self.backend, self._generation)
            self._generation = generation
        return self.backend

    # -- writing ----------------------------------------------------------------------------

    def writable(self) -> None:
        if self.readonly:
            raise IndexFormatError(f"{self.folder}: opened read-only")
        if self._writer_lock is None:
            raise IndexFormatError(f"{self.folder}: closed")

    def add_new(
        self, items: Sequence[Item], vectors: np.ndarray, tokens: SideTokens | None = None
    ) -> None:
        """Store items with ``(N, dim)`` vectors, L2-normalised here (each token for a
        multi-vector model); a duplicate id, or one already stored, is an error."""
        self.writable()
        vectors = np.asarray(vectors, dtype=np.float32)
        expected = (len(items), self.manifest.dim)
        if vectors.shape != expected:
            raise InputError(f"expected vectors of shape {expected}, got {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise InputError("vectors contain NaN or infinite values")
        ids = [item.id for item in items]
        repeated = {i for i, n in Counter(ids).items() if n > 1}
        stored = [StoredItem(i.id, i.text, i.image_path, dict(i.metadata)) for i in items]
        with self.mutex:
            clashes = self.store.existing_ids(ids) | repeated
            if clashes:
                raise InputError(f"ids already present or repeated: {sorted(clashes)[:5]}")
            self.insert(stored, normalise_tokens(vectors, self.manifest.token_dim), tokens)

    def insert(
        self, stored: list[StoredItem], vectors: np.ndarray, tokens: SideTokens | None = None
    ) -> None:
        """Store rows whose ids are new, with their unit vectors (the caller checked both)."""
        with self.mutex:
            # Token bytes reach the disk before the transaction that refers to them commits.
            refs = None if tokens is None or self.tokens is None else self.tokens.append(tokens)
            keys = self.store.add(stored, vectors, refs)
            self.backend.add(keys, vectors)
            self._generation = self.store.generation  # ours alone: we hold the writer lock

    def remove(self, ids: Sequence[str]) -> int:
        """Remove items by id; returns how many existed."""
        self.writable()
        with self.mutex:
            keys = self.store.remove(list(ids))
            self.backend.remove(keys)
            self._generation = self.store.generation
        return len(keys)

    def flush(self) -> None:
        """Save the backend's cache (FAISS) for the current state, so the next open is fast.

        Every write is durable the moment it returns; the cache only spares the next reader
        work (a reader catches up from an older cache by applying the changes since). A cache
        that cannot be written (a full disk) is a warning, not an error: it is removed, and
        rebuilt from the items when next needed.
        """
        with self.mutex:
            if self._saved_generation == self._generation:
                return
            try:
                self.backend.save(self.folder, self._epoch, self._generation)
            except OSError as error:
                for cache in self.backend.cache_files(self.folder):
                    cache.unlink(missing_ok=True)
                warnings.warn(
                    f"{self.folder}: could not save the {self.backend.name} cache ({error}); "
                    "it is rebuilt from the stored items when next needed",
                    RuntimeWarning,
                    stacklevel=3,
                )
            self._saved_generation = self._generation

    # -- reading ----------------------------------------------------------------------------

    def search(
        self, vectors: np.ndarray, k: int, filter: Filter | None, *, with_vectors: bool = False
    ) -> tuple[list[list[KeyedHit]], dict[int, np.ndarray]]:
        """The ``k`` nearest items of each ``(Q, dim)`` query vector (L2-normalised here, each
        token for a multi-vector model) that pass ``filter``, with their store keys; with
        ``with_vectors`` also the hits' stored vectors by key, read in the same snapshot."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if (
            vectors.ndim == 2
            and vectors.shape[1] == self.manifest.dim
            and np.isfinite(vectors).all()
        ):
            # malformed input is left for the backend to name
            vectors = normalise_tokens(vectors, self.manifest.token_dim)
        # One snapshot: the vectors searched, the filter and the rows returned agree even while
        # another process writes.
        with self.snapshot():
            allowed = self._columns.matching_keys(self.store, filter) if filter else None
            scores, keys = self._current_backend().search(vectors, k, allowed)
            rows = self.store.rows(np.unique(keys[keys >= 0]).tolist())
            stored: dict[int, np.ndarray] = {}
            if with_vectors:
                found = sorted(rows)
                found_vectors = self.store.vectors_at(np.array(found, dtype=np.int64))
                stored = dict(zip(found, found_vectors, strict=True))
        results = []
        for row_scores, row_keys in zip(scores.tolist(), keys.tolist(), strict=True):
            hits = []
            for score, key in zip(row_scores, row_keys, strict=True):
                row = rows.get(key)  # plain ints: a numpy scalar key costs a hash each time
                if row is not None:
                    result = SearchResult(row.id, score, row.text, row.image, row.metadata)
                    hits.append((key, result))
            results.append(hits)
        return results, stored

    def token_features(self, keys: Sequence[int]) -> SideTokens:
        """The stored token features of the items at store ``keys``, in order."""
        assert self.tokens is not None  # the caller checked that the index stores them
        with self.mutex:
            refs = self.store.token_refs(keys)
            missing = [key for key in keys if key not in refs]
            ids = [row.id for row in self.store.rows(missing[:5]).values()]
        if missing:
            raise IndexFormatError(
                f"{self.folder}: no stored token features for {ids} "
                "(run `mmret check` and `mmret repair`)"
            )
        return self.tokens.read([refs[key] for key in keys])

    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        """Those of ``ids`` that are in the index."""
        with self.mutex:
            return self.store.existing_ids(list(ids))

    def ids(self) -> list[str]:
        """Every stored item's id, oldest first."""
        with self.mutex:
            return [row[1] for row in self.store.scan()]

    def stored_vectors(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        """The ``(dim,)`` vector stored for each of ``ids`` still in the index."""
        with self.mutex:
            return self.store.vectors_of(list(ids))

    def get(self, ids: Sequence[str]) -> dict[str, StoredItem]:
        """What is stored for each of ``ids`` that is in the index (absent ids are left out)."""
        with self.mutex:
            return {id_: row for id_, (row, _) in self.store.lookup(ids).items()}

    def lookup(self, ids: Sequence[str]) -> dict[str, tuple[StoredItem, np.ndarray]]:
        """What is stored for each of ``ids`` that is in the index, with its vector."""
        with self.mutex:
            return self.store.lookup(ids)

    def info(self) -> dict[str, object]:
        with self.snapshot():
            backend = self._current_backend()
        return {
            "path": str(self.folder),
            "items": len(self),
            "encoder": self.manifest.encoder,
            "dim": self.manifest.dim,
            "token_dim": self.manifest.token_dim,
            "backend": self.manifest.backend,
            "backend_in_use": backend.name,
            "memory": self.manifest.refiner,
            "format_version": self.manifest.format_version,
            "mmret_version": self.manifest.mmret_version,
        }
