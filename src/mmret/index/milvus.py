"""A Milvus backend: the vectors live in a Milvus collection, the item store stays the truth.

By default Milvus Lite (embedded, ``pip install 'mmret[milvus]'``) keeps the collection in a
database folder ``milvus.db`` inside the index folder; the ``uri`` option points at a Milvus
standalone or cluster server instead (``http://host:19530``; a token, if the server wants one,
comes from ``$MMRET_MILVUS_TOKEN``, never from the manifest). Each item store gets a collection
of its own, ``mmret_<epoch>``, so a repaired store (a new epoch) never meets stale vectors.

Milvus applies writes as they come, so the collection may be ahead of the last saved record
(a writer killed before it saved): reopening applies the store's changes since that record,
which is idempotent here (keys above the collection's largest are added, removed keys deleted
again). The record (``milvus-cache.npz`` and a small ``milvus-<token>.json`` naming the
database and collection) is only a cache: deleting it rebuilds the collection from the store.
Milvus Lite serves one process at a time; readers beside a writer need a server.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import threading
import weakref
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from mmret.errors import IndexFormatError, InputError
from mmret.index.base import INDEXES, VectorIndex, check_vectors, top_k
from mmret.index.cache import CacheFiles, CacheMissingError

_INSERT_BATCH = 4096
_MAX_LIMIT = 16_384  # Milvus's largest top-k
_KEY_BATCH = 4096  # keys per `key in [...]` expression
_LITE_FILE = "milvus.db"
TOKEN_VARIABLE = "MMRET_MILVUS_TOKEN"
_STANDALONE = "mmret_standalone"


def _client(uri: str) -> Any:
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise InputError(
            "backend 'milvus' needs pymilvus and milvus-lite: pip install 'mmret[milvus]'"
        ) from None
    with _LITE_LOCK:  # a Lite server being stopped is not handed to a new client meanwhile
        try:
            client = MilvusClient(uri=uri, token=os.environ.get(TOKEN_VARIABLE, ""))
        except Exception as error:  # pymilvus raises its own hierarchy, and OSError for Lite
            raise IndexFormatError(
                f"cannot open Milvus at {uri} ({error}); Milvus Lite serves one process at a "
                "time: readers beside a writer need a Milvus server (backend option uri)"
            ) from None
        if _is_lite(uri):
            _LITE_CLIENTS[_lite_key(uri)] += 1
    return client


def _is_lite(uri: str) -> bool:
    """A database file served by Milvus Lite (pymilvus's rule), not a server's address."""
    return uri.endswith(".db")


def _lite_key(uri: str) -> str:
    return os.path.abspath(uri)  # noqa: PTH100 - milvus_lite's own key for a database


#: Milvus Lite serves each database from a server inside the first process that opened it,
#: and pymilvus never stops it: the database stays locked against other processes until this
#: one exits. Clients open per database here, so that the last to close stops its server.
_LITE_CLIENTS: Counter[str] = Counter()
_LITE_LOCK = threading.Lock()


def _close_client(client: Any, uri: str) -> None:
    client.close()
    if not _is_lite(uri):
        return
    from milvus_lite.server_manager import server_manager_instance

    path = _lite_key(uri)
    with _LITE_LOCK:
        _LITE_CLIENTS[path] -= 1
        if _LITE_CLIENTS[path] == 0:
            del _LITE_CLIENTS[path]
            server_manager_instance.release_server(path)


#: Private databases of standalone instances: every one this process made and has not yet
#: deleted, and those whose instance is gone. An instance's finalizer only records that: it
#: may run inside garbage collection while this module's or Milvus Lite's lock is held, so the
#: server is stopped and the folder deleted later, by :func:`_discard_orphans`.
_PRIVATE: set[str] = set()
_ORPHANED: list[str] = []


def _discard_orphans() -> None:
    """Stop the Lite server of every orphaned private database, then delete its folder (a
    server left running writes the database's files again when the process exits)."""
    while _ORPHANED:
        scratch = _ORPHANED.pop()
        _PRIVATE.discard(scratch)
        path = _lite_key(str(Path(scratch) / _LITE_FILE))
        with _LITE_LOCK:
            if _LITE_CLIENTS.pop(path, 0):
                from milvus_lite.server_manager import server_manager_instance

                server_manager_instance.release_server(path)
        shutil.rmtree(scratch, ignore_errors=True)


@atexit.register
def _discard_private_databases() -> None:
    _ORPHANED.extend(_PRIVATE)  # instances still alive at exit too
    _discard_orphans()


class _TwiceStoredError(Exception):
    """A collection holds some row more than once."""


@INDEXES.register("milvus")
class MilvusIndex(VectorIndex):
    """Inner-product search in a Milvus collection of ``(key, vector)`` rows.

    Options: ``uri`` (a Milvus server; empty: Milvus Lite in the index folder),
    ``index_type`` (``FLAT``: exact, the only kind Milvus Lite builds; a server also takes
    ``HNSW``, ``IVF_FLAT``, ``IVF_PQ``, ...), ``index_params`` and ``search_params`` (passed to
    Milvus as they are, e.g. ``{"M": 16, "efConstruction": 200}`` and ``{"ef": 128}``).
    """

    name = "milvus"
    multi_vector_twin = "milvus-maxsim"  # late interaction: mmret.index.milvus_maxsim

    def __init__(
        self,
        dim: int,
        uri: str = "",
        index_type: str = "FLAT",
        index_params: dict[str, Any] | None = None,
        search_params: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(dim)
        self.uri, self.index_type = uri, index_type
        self.index_params = dict(index_params or {})
        self.search_params = dict(search_params or {})
        self._db: Any = None
        self._where = ""  # the database this instance uses (uri, or a Lite file)
        self._collection = _STANDALONE
        self._count, self._last = 0, -1

    def config(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "index_type": self.index_type,
            "index_params": self.index_params,
            "search_params": self.search_params,
        }

    # -- the collection ---------------------------------------------------------------------

    def _open(self, where: str, collection: str, fresh: bool) -> None:
        """Use ``collection`` in the database at ``where``, emptied first when ``fresh``."""
        self._connect(where)
        self._collection = collection
        exists = self._db.has_collection(collection)
        if exists and fresh:
            self._db.drop_collection(collection)
        if not exists or fresh:
            self._create(collection)
            self._count, self._last = 0, -1
        else:
            self._db.load_collection(collection)
            rows = self._key_column()
            keys = np.unique(rows)
            self._count, self._last = len(keys), int(keys[-1]) if len(keys) else -1
            if len(rows) != len(keys) * self._rows_per_item:
                raise _TwiceStoredError(collection)

    def _create(self, collection: str) -> None:
        from pymilvus import DataType

        schema = self._db.create_schema(auto_id=False)
        self._add_fields(schema, DataType)
        index = self._db.prepare_index_params()
        index.add_index(
            "vector", index_type=self.index_type, metric_type="IP", params=self.index_params
        )
        # Strong consistency: a search sees every write that returned before it.
        self._db.create_collection(
            collection, schema=schema, index_params=index, consistency_level="Strong"
        )

    def _add_fields(self, schema: Any, types: Any) -> None:
        """The collection's fields: one ``(key, vector)`` row per item."""
        schema.add_field("key", types.INT64, is_primary=True)
        schema.add_field("vector", types.FLOAT_VECTOR, dim=self.dim)

    def _ready(self) -> Any:
        """The client, opening a private Milvus Lite database for an instance used alone."""
        if self._db is None:
            where = self.uri
            if not where:
                _discard_orphans()
                scratch = tempfile.mkdtemp(prefix="mmret-milvus-")
                _PRIVATE.add(scratch)
                weakref.finalize(self, _ORPHANED.append, scratch)
                where = str(Path(scratch) / _LITE_FILE)
            self._open(where, _STANDALONE, fresh=True)
        return self._db

    # -- the interface ----------------------------------------------------------------------

    def __len__(self) -> int:
        return self._count

    @property
    def last_key(self) -> int:
        return self._last

    def stored_keys(self) -> np.ndarray:
        return np.unique(self._key_column())

    def _key_column(self) -> np.ndarray:
        """The key of every row in the collection (one per item, or one per token)."""
        if self._db is None:
            return np.empty(0, dtype=np.int64)
        # One query (Milvus Lite has no query iterator): 40,000 keys took 0.9 s.
        rows = self._db.query(self._collection, filter="key >= 0", output_fields=["key"])
        return np.asarray([row["key"] for row in rows], dtype=np.int64)

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        keys = np.asarray(keys, dtype=np.int64)
        check_vectors(self, keys, vectors, self.last_key)
        if not len(keys):
            return
        db = self._ready()
        vectors = np.asarray(vectors, dtype=np.float32)
        per_batch = max(1, _INSERT_BATCH // self._rows_per_item)
        for start in range(0, len(keys), per_batch):  # ascending: a prefix if interrupted
            batch = slice(start, start + per_batch)
            db.insert(self._collection, self._rows(keys[batch], vectors[batch]))
        self._count += len(keys)
        self._last = int(keys[-1])

    @property
    def _rows_per_item(self) -> int:
        return 1

    def _rows(self, keys: np.ndarray, vectors: np.ndarray) -> list[dict[str, Any]]:
        """The collection's rows for ``(N,)`` keys and their ``(N, dim)`` vectors."""
        pairs = zip(keys.tolist(), vectors.tolist(), strict=True)
        return [{"key": key, "vector": vector} for key, vector in pairs]

    def build(self, chunks: Iterable[tuple[np.ndarray, np.ndarray]], total: int) -> None:
        """Refill the collection from the store, chunk by chunk (it may hold a newer state)."""
        self._ready()
        self._open(self._where, self._collection, fresh=True)
        for keys, vectors in chunks:
            self.add(keys, vectors)

    def remove(self, keys: np.ndarray) -> None:
        if self._db is None or not len(keys):
            return
        for start in range(0, len(keys), _KEY_BATCH):
            wanted = np.asarray(keys[start : start + _KEY_BATCH], dtype=np.int64).tolist()
            where = f"key in {wanted}"  # every row of these items (one, or one per token)
            present = self._db.query(self._collection, filter=where, output_fields=["key"])
            gone = {row["key"] for row in present}
            if gone:
                self._db.delete(self._collection, filter=where)
                self._count -= len(gone)

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        queries = self._check(queries, k)
        empty = top_k(np.zeros((len(queries), 0), np.float32), np.empty(0, np.int64), k)
        if self._db is None or not self._count or not len(queries):
            return empty
        if allowed is not None:
            allowed = np.asarray(allowed, dtype=np.int64)
            allowed = allowed[allowed <= self._last]  # keys a writer added after this view
            if not len(allowed):
                return empty
        return self._search(queries, k, allowed, empty)

    def _search(
        self,
        queries: np.ndarray,
        k: int,
        allowed: np.ndarray | None,
        empty: tuple[np.ndarray, np.ndarray],
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` of checked ``(Q, dim)`` queries in a non-empty collection, among
        ``allowed`` keys (non-empty) or all; ``empty`` is the result with nothing found."""
        where = "" if allowed is None else f"key in {allowed.tolist()}"
        results = self._db.search(
            self._collection,
            data=queries.tolist(),
            limit=min(k, _MAX_LIMIT, self._count),
            filter=where,
            search_params={"metric_type": "IP", "params": self.search_params},
        )
        scores, found = empty[0].copy(), empty[1].copy()
        for row, hits in enumerate(results):
            for column, hit in enumerate(hits):
                scores[row, column], found[row, column] = hit["distance"], hit["key"]
        return scores, found

    # -- persistence: Milvus holds the data; the record names where -------------------------

    def _record(self, folder: Path) -> CacheFiles:
        return CacheFiles(folder, self.name, "json")

    def save(self, folder: Path, epoch: str, generation: int) -> None:
        db = self._ready()
        db.flush(self._collection)
        where = self._where
        if Path(where).parent == folder:
            where = Path(where).name  # inside the index folder: stays valid if it moves
        names = {"uri": where, "collection": self._collection}
        self._record(folder).save(
            epoch, generation, lambda path: path.write_text(json.dumps(names)), {}
        )

    def load(self, folder: Path, epoch: str) -> int | None:
        """Reopen the collection the record names; without a usable record, use this store's
        collection, left as it is until :meth:`build` refills it, and return ``None``."""
        try:
            cache, names = self._record(folder).load(epoch, lambda path: path.read_text())
            where, collection = json.loads(str(names))["uri"], json.loads(str(names))["collection"]
        except (CacheMissingError, ValueError, KeyError, TypeError):
            where, collection = "", ""
        if collection:
            where = self.uri or str(folder / where)
            if self._connect(where).has_collection(collection) and self._reopened(
                where, collection
            ):
                return cache.generation
        self._connect(self.uri or str(folder / _LITE_FILE))
        self._collection, self._count, self._last = f"mmret_{epoch}", 0, -1
        return None

    def _reopened(self, where: str, collection: str) -> bool:
        """Open an existing collection; ``False`` if Milvus cannot load it or holds rows twice
        (Milvus Lite killed mid-write can leave its segment files short, or keep a row both
        saved and replayed, and a search for all would then return it twice and miss others):
        it is then rebuilt from the store."""
        from pymilvus.exceptions import MilvusException

        try:
            self._open(where, collection, fresh=False)
        except (MilvusException, _TwiceStoredError):
            return False
        return True

    def _connect(self, where: str) -> Any:
        if self._db is None or where != self._where:
            self.close()
            self._db, self._where = _client(where), where
        return self._db

    def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            _close_client(db, self._where)

    def cache_files(self, folder: Path) -> list[Path]:
        """The record (the Milvus Lite database is not listed: its collection is rebuilt, not
        deleted, when the record is gone)."""
        return self._record(folder).files()
