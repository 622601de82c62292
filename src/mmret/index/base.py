"""The vector index interface every backend implements, and the registry of backends."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from mmret.errors import InputError
from mmret.registry import Registry

#: Full-precision vectors by key: ``(N,)`` keys in, ``(M,)`` keys found and ``(M, dim)`` out.
#: Reads the full-precision ``(M, dim)`` vectors of ``(M,)`` keys, in their order, from the
#: item store (for backends that re-score compressed candidates exactly).
VectorSource = Callable[[np.ndarray], np.ndarray]


class VectorIndex(ABC):
    """Inner-product search over ``(N, dim)`` unit vectors, each identified by an int64 key.

    Keys arrive in increasing order (the item store never reuses one), which lets backends map
    keys to rows with a binary search, and lets a stale copy catch up by adding the keys above
    :attr:`last_key`. A backend is a derived, rebuildable structure: the item store holds the
    truth, so ``save`` writes a cache and ``load`` may find none.
    """

    name: str
    #: ``True`` for backends that score flattened token sets by MaxSim (see
    #: :mod:`mmret.late_interaction`): an index of a multi-vector model needs one of those.
    multi_vector = False
    #: For a single-vector backend that has a multi-vector counterpart: its registered name,
    #: used instead for multi-vector models (``milvus`` -> ``milvus-maxsim``).
    multi_vector_twin: str | None = None
    #: Set by :meth:`load` when the cache it read is in an older layout: a writer saves it anew.
    cache_outdated = False

    def __init__(self, dim: int) -> None:
        self.dim = dim

    @abstractmethod
    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Add ``(N,)`` keys, each greater than every key present, with ``(N, dim)`` vectors."""

    @abstractmethod
    def remove(self, keys: np.ndarray) -> None:
        """Forget these keys (unknown keys are ignored)."""

    @abstractmethod
    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` of ``(Q, dim)`` queries: ``(Q, k)`` scores and keys, best first.

        ``allowed`` (sorted keys) restricts the candidates. Rows with fewer than ``k``
        candidates are padded with score ``-inf`` and key ``-1``.
        """

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def stored_keys(self) -> np.ndarray:
        """The ``(len(self),)`` keys present, ascending (``mmret check`` compares them with the
        store's)."""

    @property
    @abstractmethod
    def last_key(self) -> int:
        """No key present is larger (-1 when empty); keys added later are all larger."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """The options this backend was created with (stored in the index manifest)."""

    def use_stored_vectors(self, source: VectorSource) -> None:  # noqa: B027
        """Give a backend that re-scores compressed candidates exactly a way to read their full
        vectors: ``source`` maps ``(M,)`` keys to their ``(M, dim)`` stored vectors (the item
        store's rows, read inside the search's snapshot). Backends keeping full vectors
        themselves ignore it."""

    def build(self, chunks: Iterable[tuple[np.ndarray, np.ndarray]], total: int) -> None:
        """Add a whole collection given as chunks of ``(N,)`` keys and ``(N, dim)`` vectors,
        ``total`` rows in all. Here: joined and added at once (a backend choosing its structure
        by size sees the whole); backends that train on a sample stream the chunks instead."""
        parts = list(chunks)
        if parts:
            self.add(
                np.concatenate([keys for keys, _ in parts]),
                np.concatenate([vectors for _, vectors in parts]),
            )

    def close(self) -> None:  # noqa: B027
        """Let go of what the backend holds outside this object (connections, an embedded
        server); the retriever calls it once, when it closes. Default: nothing held."""

    def save(self, folder: Path, epoch: str, generation: int) -> None:  # noqa: B027
        """Persist a cache of the structure as of the store's ``generation`` (default: none)."""

    def load(self, folder: Path, epoch: str) -> int | None:
        """Restore a cache saved for the store named ``epoch``; returns the generation it was
        saved at, or ``None`` when there is none, it is unreadable or of another store."""
        return None

    def cache_files(self, folder: Path) -> list[Path]:
        """The cache files :meth:`save` left in ``folder`` (safe to delete: rebuilt on open)."""
        return []

    def _check(self, queries: np.ndarray, k: int) -> np.ndarray:
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise InputError(f"queries must have shape (Q, {self.dim}), got {queries.shape}")
        if not np.isfinite(queries).all():
            raise InputError("queries contain NaN or infinite values")
        if k < 1:
            raise InputError(f"k must be at least 1, got {k}")
        return np.ascontiguousarray(queries)


class GrowableArray:
    """An array that is appended to often: over-allocates, so each append copies O(new rows)."""

    def __init__(self, dtype: type, width: int | None = None) -> None:
        self._shape_tail: tuple[int, ...] = () if width is None else (width,)
        self._buffer = np.empty((0, *self._shape_tail), dtype=dtype)
        self._n = 0

    @classmethod
    def wrapping(cls, array: np.ndarray) -> GrowableArray:
        """Over ``array`` as it is, without copying (it may be a read-only memory map): the
        first change copies it into memory of its own."""
        grown = cls(array.dtype.type, array.shape[1] if array.ndim == 2 else None)
        grown._buffer, grown._n = array, len(array)
        return grown

    def __len__(self) -> int:
        return self._n

    @property
    def view(self) -> np.ndarray:
        return self._buffer[: self._n]

    def append(self, rows: np.ndarray) -> None:
        if not len(rows):
            return
        needed = self._n + len(rows)
        if needed > len(self._buffer):
            grown = np.empty(
                (max(needed, 2 * len(self._buffer), 1024), *self._shape_tail), self._buffer.dtype
            )
            grown[: self._n] = self.view
            self._buffer = grown
        self._buffer[self._n : needed] = rows
        self._n = needed

    def keep(self, mask: np.ndarray) -> None:
        kept = self.view[mask]
        if self._buffer.flags.writeable:
            self._buffer[: len(kept)] = kept
        else:
            self._buffer = kept
        self._n = len(kept)


def check_vectors(index: VectorIndex, keys: np.ndarray, vectors: np.ndarray, last: int) -> None:
    if vectors.ndim != 2 or vectors.shape != (len(keys), index.dim):
        raise InputError(
            f"expected vectors of shape ({len(keys)}, {index.dim}), got {vectors.shape}"
        )
    if len(keys) and (keys[0] <= last or np.any(np.diff(keys) <= 0)):
        raise InputError("keys must be increasing and greater than every key already present")


def rows_of(sorted_keys: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Positions in ``sorted_keys`` of those ``wanted`` keys that are present."""
    if len(sorted_keys) == 0:
        return np.empty(0, dtype=np.int64)
    rows = np.searchsorted(sorted_keys, wanted)
    rows = np.minimum(rows, len(sorted_keys) - 1)
    found: np.ndarray = rows[sorted_keys[rows] == wanted]
    return found


def live_rows(
    keys: np.ndarray, alive: np.ndarray, dead: int, allowed: np.ndarray | None
) -> np.ndarray | None:
    """For a backend that tombstones removed rows: the rows a search may return, those of the
    ``allowed`` keys still alive, or every live row when some are dead; ``None`` for all."""
    if allowed is not None:
        rows = rows_of(keys, np.asarray(allowed, dtype=np.int64))
        found: np.ndarray = rows[alive[rows]]
        return found
    return np.flatnonzero(alive) if dead else None


def top_k(scores: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` columns of ``(Q, N)`` scores, sorted, padded to ``k`` with ``-inf`` / ``-1``."""
    n_queries, n = scores.shape
    out_scores = np.full((n_queries, k), -np.inf, dtype=np.float32)
    out_keys = np.full((n_queries, k), -1, dtype=np.int64)
    if n == 0:
        return out_scores, out_keys
    kk = min(k, n)
    if kk < n:
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
    else:
        part = np.broadcast_to(np.arange(n), (n_queries, n))
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    best = np.take_along_axis(part, order, axis=1)
    out_scores[:, :kk] = np.take_along_axis(part_scores, order, axis=1)
    out_keys[:, :kk] = keys[best]
    return out_scores, out_keys


def scores_allowed_directly(allowed: int, total: int, *, up_to: int, below_share: float) -> bool:
    """How a filtered search runs, decided per query from how many items the filter allows:
    ``True`` to score those rows directly (exact, costs O(allowed)), ``False`` to search the
    backend's whole structure restricted to them (costs about the same whatever the filter).

    Every backend asks here, with its own two crossovers: ``up_to`` rows are always cheaper
    to score than a structure search, and below ``below_share`` of the items the structure
    loses (HNSW with an ID selector walks a graph mostly made of excluded items and misses
    neighbours: recall@10 0.38 at 1 % of 100,000 items, 0.98 at 10 %).
    """
    return allowed <= up_to or allowed < below_share * total


#: name -> factory ``(dim, **options) -> VectorIndex``; multi-vector backends also take
#: ``token_dim``.
INDEXES: Registry[Callable[..., VectorIndex]] = Registry("index backend")


#: ``backend="auto"`` searches exactly below this many items and with FAISS from here on.
AUTO_FAISS_FROM = 100_000
#: ... and with ``ivfpq`` once the float32 vectors would take this many bytes (4M items at
#: 256-d, 2M at 512-d): HNSW keeps every vector and its graph in memory, ``ivfpq`` keeps 1/32
#: of them as codes, memory-mapped (benchmarks/large_collection.py).
AUTO_IVFPQ_FROM_BYTES = 4 << 30
#: For multi-vector models, ``"auto"`` is exact MaxSim below this many items and ``plaid``
#: from here on (benchmarks/multivector.py: plaid answered 6.9x faster than brute force at
#: 6,000 documents of 49 x 128 tokens and 57x at 100,000 of 32 x 128, recall@10 0.87-0.94;
#: below ~10,000 brute force stays well under a second on one core, and exact).
AUTO_PLAID_FROM = 10_000


def new_backend(
    name: str, options: dict[str, Any], dim: int, count: int, token_dim: int | None = None
) -> VectorIndex:
    """An empty backend as an index manifest names it, resolving ``"auto"`` by item ``count``
    and by whether the model is multi-vector (``token_dim`` set).

    The options are the manifest's, and apply only to the backend they were given for.
    """
    resolved = name
    if name == "auto":
        if token_dim is not None:
            resolved = "plaid" if count >= AUTO_PLAID_FROM else "maxsim"
        else:
            resolved = "faiss" if count >= AUTO_FAISS_FROM else "exact"
            if count * dim * 4 >= AUTO_IVFPQ_FROM_BYTES:
                resolved = "ivfpq"
    factory = INDEXES.get(resolved)
    twin = getattr(factory, "multi_vector_twin", None)
    if token_dim is not None and twin is not None:  # one name for both kinds of model
        factory = INDEXES.get(twin)
    multi_vector = bool(getattr(factory, "multi_vector", False))
    if multi_vector != (token_dim is not None):
        raise InputError(
            f"backend {resolved!r} scores "
            + (
                "token sets, but this model gives one vector per item"
                if multi_vector
                else "one vector per item, but this model gives token sets (use maxsim or auto)"
            )
        )
    chosen = options if resolved == name else {}
    if multi_vector:
        return factory(dim, token_dim=token_dim, **chosen)
    return factory(dim, **chosen)
