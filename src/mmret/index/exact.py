"""Exact search: one matrix product over every stored vector. Best below ~100k items."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, cast

import numpy as np
from threadpoolctl import ThreadpoolController

from mmret.index.base import (
    INDEXES,
    GrowableArray,
    VectorIndex,
    check_vectors,
    rows_of,
    scores_allowed_directly,
    top_k,
)
from mmret.index.cache import CacheFiles, CacheMissingError

_SCORES_PER_BLOCK = 1 << 25  # 128 MB of float32 scores
#: Below this many multiply-adds one BLAS thread is faster than waking several, and it leaves
#: no idle BLAS threads spinning on the cores the text encoder needs next (measured: a text
#: query over 1,000 photos took 36 ms end to end with threaded BLAS, 11 ms with one thread).
_ONE_THREAD_BELOW = 1 << 24
#: A filter allowing more than this share of the items scores every row and drops the others:
#: gathering that many scattered rows moves more memory than one pass over all of them.
_GATHER_BELOW_SHARE = 0.25


@functools.cache
def _blas() -> ThreadpoolController:
    return ThreadpoolController()


def single_threaded() -> Any:
    """A context in which BLAS and OpenMP (FAISS) run on one thread: for many small products
    in a row (one query at a time), where waking idle threads costs more than they save."""
    return _blas().limit(limits=1)


def scores(queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """``(Q, N)`` inner products of ``(Q, D)`` queries and ``(N, D)`` vectors."""
    product: np.ndarray
    if queries.shape[0] * vectors.shape[0] * vectors.shape[1] >= _ONE_THREAD_BELOW:
        product = queries @ vectors.T
    else:
        with _blas().limit(limits=1, user_api="blas"):
            product = queries @ vectors.T
    return product


@INDEXES.register("exact")
class ExactIndex(VectorIndex):
    name = "exact"

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self._keys = GrowableArray(np.int64)
        self._vectors = GrowableArray(np.float32, dim)

    def __len__(self) -> int:
        return len(self._keys)

    def stored_keys(self) -> np.ndarray:
        return self._keys.view.copy()

    def stored_vectors(self) -> np.ndarray:
        """The ``(len(self), dim)`` vectors, in the order of :meth:`stored_keys`."""
        return self._vectors.view

    @property
    def last_key(self) -> int:
        return int(self._keys.view[-1]) if len(self) else -1

    def config(self) -> dict[str, Any]:
        return {}

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        keys = np.asarray(keys, dtype=np.int64)
        check_vectors(self, keys, vectors, self.last_key)
        self._keys.append(keys)
        self._vectors.append(np.asarray(vectors, dtype=np.float32))

    def remove(self, keys: np.ndarray) -> None:
        keep = ~np.isin(self._keys.view, keys)
        if keep.all():
            return  # nothing to drop: leave a memory-mapped cache mapped, not copied
        self._keys.keep(keep)
        self._vectors.keep(keep)

    def save(self, folder: Path, epoch: str, generation: int) -> None:
        vectors = self._vectors.view

        def write(path: Path) -> None:
            with path.open("wb") as handle:
                np.save(handle, vectors, allow_pickle=False)

        self._cache(folder).save(epoch, generation, write, {"keys": self._keys.view})

    def cache_files(self, folder: Path) -> list[Path]:
        return self._cache(folder).files()

    def _cache(self, folder: Path) -> CacheFiles:
        return CacheFiles(folder, self.name, "npy")  # named by backend: subclasses score apart

    def load(self, folder: Path, epoch: str) -> int | None:
        """Memory-maps the cached vectors: the first search reads them from the page cache
        instead of every row from SQLite."""
        try:
            cache, mapped = self._cache(folder).load(epoch, _map_vectors)
        except CacheMissingError:
            return None
        vectors, keys = cast(np.ndarray | None, mapped), cache.arrays.get("keys")
        if vectors is None or keys is None or vectors.shape != (len(keys), self.dim):
            return None
        self._keys, self._vectors = GrowableArray.wrapping(keys), GrowableArray.wrapping(vectors)
        return cache.generation

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        queries = self._check(queries, k)
        keys, vectors = self._keys.view, self._vectors.view
        excluded = None
        if allowed is not None:
            rows = rows_of(keys, np.asarray(allowed, dtype=np.int64))
            if scores_allowed_directly(
                len(rows), len(keys), up_to=0, below_share=_GATHER_BELOW_SHARE
            ):
                keys, vectors = keys[rows], vectors[rows]
            else:
                excluded = np.ones(len(keys), dtype=bool)
                excluded[rows] = False
        # Score a block of queries at a time: 1,000 queries against a million items would
        # otherwise need a 4 GB score matrix (and as much again to rank it).
        block = max(1, _SCORES_PER_BLOCK // max(len(keys), 1))
        parts = [
            self._best(queries[start : start + block], vectors, keys, k, excluded)
            for start in range(0, len(queries), block)
        ] or [top_k(np.zeros((0, len(keys)), np.float32), keys, k)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def score(self, queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """``(Q, N)`` scores of ``(Q, dim)`` queries against ``(N, dim)`` stored vectors (inner
        products here; subclasses score another way over the same storage)."""
        return scores(queries, vectors)

    def _best(
        self,
        queries: np.ndarray,
        vectors: np.ndarray,
        keys: np.ndarray,
        k: int,
        excluded: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        block = self.score(queries, vectors)
        if excluded is None:
            return top_k(block, keys, k)
        block[:, excluded] = -np.inf
        best_scores, best_keys = top_k(block, keys, k)
        best_keys[np.isneginf(best_scores)] = -1  # fewer than k allowed: pad as top_k does
        return best_scores, best_keys


def _map_vectors(path: Path) -> np.ndarray:
    vectors = np.load(path, mmap_mode="r", allow_pickle=False)
    if vectors.dtype != np.float32 or vectors.ndim != 2:
        raise ValueError(f"{path}: not a float32 matrix")
    return np.asarray(vectors)  # a plain array over the map (results are no memmaps)
