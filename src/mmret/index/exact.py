"""Exact search: one matrix product over every stored vector. Best below ~100k items."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from threadpoolctl import ThreadpoolController

from mmret.index.base import INDEXES, GrowableArray, VectorIndex, check_vectors, rows_of, top_k

_SCORES_PER_BLOCK = 1 << 25  # 128 MB of float32 scores
#: Below this many multiply-adds one BLAS thread is faster than waking several, and it leaves
#: no idle BLAS threads spinning on the cores the text encoder needs next (measured: a text
#: query over 1,000 photos took 36 ms end to end with threaded BLAS, 11 ms with one thread).
_ONE_THREAD_BELOW = 1 << 24


@functools.cache
def _blas() -> ThreadpoolController:
    return ThreadpoolController()


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
        self._keys.keep(keep)
        self._vectors.keep(keep)

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        queries = self._check(queries, k)
        keys, vectors = self._keys.view, self._vectors.view
        if allowed is not None:
            rows = rows_of(keys, np.asarray(allowed, dtype=np.int64))
            keys, vectors = keys[rows], vectors[rows]
        # Score a block of queries at a time: 1,000 queries against a million items would
        # otherwise need a 4 GB score matrix (and as much again to rank it).
        block = max(1, _SCORES_PER_BLOCK // max(len(keys), 1))
        parts = [
            top_k(scores(queries[start : start + block], vectors), keys, k)
            for start in range(0, len(queries), block)
        ] or [top_k(np.zeros((0, len(keys)), np.float32), keys, k)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
