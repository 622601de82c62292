"""Large collections on one machine: FAISS IVF-PQ codes memory-mapped from disk, the best
candidates re-scored exactly from the full vectors.

A 256-d float32 vector takes 1 KiB; its product-quantisation code takes ``pq`` bytes (32 by
default, 1/32 of that). The inverted lists of codes are the backend's cache file, memory-mapped
when an index opens (FAISS ``IO_FLAG_MMAP_IFC``), so resident memory holds the pages searches
touch, not the collection. Compressed scores alone rank too coarsely for a recall@10 of 0.9, so
the ``rescore`` best candidates of each query are scored exactly against their full vectors:
inside an index those are read from the item store (SQLite, the source of truth), only those
rows, at search time (:meth:`use_stored_vectors`); used on its own, the backend keeps the
vectors it was given in memory instead (tests, small collections).

Until ``train_from`` vectors are present there is too little to train the quantisers on: rows
are searched exactly. Training sizes the inverted lists for the collection (``nlist`` 0: a
power of two near ``sqrt(N)``); one filled a batch at a time is retrained, from its full
vectors read a chunk at a time, each time it has grown 16-fold. Removal drops codes from the
inverted lists directly (IVF can), so nothing is tombstoned in the structure.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from mmret.errors import InputError
from mmret.index.base import (
    INDEXES,
    GrowableArray,
    VectorSource,
    check_vectors,
    rows_of,
    scores_allowed_directly,
    top_k,
)
from mmret.index.cache import CacheFiles
from mmret.index.exact import ExactIndex
from mmret.index.exact import scores as inner_products
from mmret.index.faiss_ann import FaissIndex, faiss

_DIRECT_BELOW_SHARE = 0.05  # as faiss_ann: below this share a filter's rows are scored directly
#: Training samples per inverted list (FAISS warns below 39) and for the codec at least.
_TRAIN_PER_LIST = 64
_MIN_TRAIN = 16_384
_CODES_PER_BYTE = 256
_REGROW_CHUNK = 1 << 18  # full vectors read at a time when retraining
_RESCORE_BLOCK = 64  # queries re-scored at a time: 64 x 256 candidates x 256 d is 16 MB


@INDEXES.register("ivfpq")
class IvfPqIndex(FaissIndex):
    """IVF-PQ over row positions, as :class:`FaissIndex` keeps them.

    Options: ``nlist`` (inverted lists; 0 picks by size when training), ``pq`` (code bytes per
    vector, a divisor of ``dim``; 0: ``dim / 8``), ``nprobe`` (lists searched per query),
    ``rescore`` (candidates per query scored exactly), ``train_from`` (vectors needed before
    training, at least 256), ``exact_below`` (a filter allowing at most this many items scores
    them directly).
    """

    name = "ivfpq"

    def __init__(
        self,
        dim: int,
        nlist: int = 0,
        pq: int = 0,
        nprobe: int = 32,
        rescore: int = 1024,
        train_from: int = 20_000,
        exact_below: int = 2_000,
    ) -> None:
        super().__init__(dim, kind="ivf", nprobe=nprobe, exact_below=exact_below)
        pq = pq or _default_pq(dim)
        if pq < 1 or dim % pq:
            raise InputError(f"ivfpq: pq={pq} bytes must divide the dimension {dim}")
        for option, value, least in (
            ("nprobe", nprobe, 1),
            ("rescore", rescore, 1),
            ("train_from", train_from, _CODES_PER_BYTE),  # each codebook learns 256 centroids
        ):
            if value < least:
                raise InputError(f"ivfpq: {option} must be at least {least}, got {value}")
        if nlist < 0:
            raise InputError(f"ivfpq: nlist must be 0 (automatic) or positive, got {nlist}")
        self.nlist, self.pq = nlist, pq
        self.rescore, self.train_from = rescore, train_from
        self._pending = ExactIndex(dim)  # rows held exactly until there are enough to train
        self._source: VectorSource | None = None
        self._full: GrowableArray | None = GrowableArray(np.float32, dim)  # when no source
        self._expected = 0  # a bulk build's total: sizes the lists for it, not for its 1st chunk

    def config(self) -> dict[str, Any]:
        return {
            "nlist": self.nlist,
            "pq": self.pq,
            "nprobe": self.nprobe,
            "rescore": self.rescore,
            "train_from": self.train_from,
            "exact_below": self.exact_below,
        }

    def use_stored_vectors(self, source: VectorSource) -> None:
        self._source, self._full = source, None

    @property
    def trained(self) -> bool:
        return self._index is not None

    # -- size and keys: the pending rows until trained --------------------------------------

    def __len__(self) -> int:
        return super().__len__() if self.trained else len(self._pending)

    def stored_keys(self) -> np.ndarray:
        return super().stored_keys() if self.trained else self._pending.stored_keys()

    @property
    def last_key(self) -> int:
        return super().last_key if self.trained else self._pending.last_key

    # -- writing ----------------------------------------------------------------------------

    def build(self, chunks: Iterable[tuple[np.ndarray, np.ndarray]], total: int) -> None:
        """Add a whole collection chunk by chunk (each ``(N,)`` keys, ``(N, dim)`` vectors),
        training on the first chunk with the lists sized for ``total`` vectors."""
        self._expected = total
        try:
            for keys, vectors in chunks:
                self.add(keys, vectors)
        finally:
            self._expected = 0

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        keys = np.asarray(keys, dtype=np.int64)
        check_vectors(self, keys, vectors, self.last_key)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if not self.trained:
            if len(self._pending) + len(keys) < self.train_from:
                self._pending.add(keys, vectors)
                return
            keys = np.concatenate([self._pending.stored_keys(), keys])
            vectors = np.concatenate([self._pending.stored_vectors(), vectors])
            self._pending = ExactIndex(self.dim)
        super().add(keys, vectors)
        if self._full is not None:
            self._full.append(vectors)
        self._regrow_if_outgrown()

    def _add_rows(self, vectors: np.ndarray) -> None:
        # Numbered explicitly: after removals FAISS's own count is below the next row position.
        first = len(self._keys)
        self._index.add_with_ids(vectors, np.arange(first, first + len(vectors), dtype=np.int64))

    def remove(self, keys: np.ndarray) -> None:
        if not self.trained:
            self._pending.remove(keys)
            return
        rows = rows_of(self._keys.view, np.asarray(keys, dtype=np.int64))
        rows = rows[self._alive.view[rows]]
        if not len(rows):
            return
        self._own()  # a memory-mapped structure is read-only
        faiss.extract_index_ivf(self._index).remove_ids(faiss.IDSelectorBatch(rows))
        self._alive.view[rows] = False  # (a loaded record is a copy: writable)
        self._dead += len(rows)

    def _new_index(self, first: np.ndarray) -> Any:
        return self._trained_index(first, max(len(first), self._expected))

    def _trained_index(self, rows: np.ndarray, n: int) -> Any:
        """An empty IVF-PQ structure for ``n`` vectors, trained on a sample of ``rows``."""
        nlist = min(self.nlist or _auto_lists(n), len(rows) // 39) or 1  # 39 points a list
        # No OPQ rotation: it trained 13x slower (13 s for 1,500 rows of 16-d) and the exact
        # re-scoring recovers what finer codes would.
        spec = f"IVF{nlist},PQ{self.pq}"
        index = faiss.index_factory(self.dim, spec, faiss.METRIC_INNER_PRODUCT)
        # The factory turns on polysemous training (an annealing of code orders for Hamming
        # pre-filters, unused here): it took 17 s of 18 to train a 1,500-row index.
        index.do_polysemous_training = False
        sample_size = max(_TRAIN_PER_LIST * nlist, _MIN_TRAIN)
        index.train(rows[np.random.default_rng(0).permutation(len(rows))[:sample_size]])
        return index

    def _regrow_if_outgrown(self) -> None:
        """Retrain with more lists once the collection outgrew those it was trained with
        (``nlist`` 0 only): an index filled a batch at a time was trained at ``train_from``
        rows. At 4x the lists (16x the rows) a rebuild costs about 1/15 of what was added
        since, and list lengths stay within 4x of the automatic choice."""
        lists = faiss.extract_index_ivf(self._index).nlist
        if self.nlist or min(_auto_lists(len(self)), len(self) // 39) < 4 * lists:
            return
        live = np.flatnonzero(self._alive.view)
        rng = np.random.default_rng(0)
        sample_rows = np.sort(rng.permutation(live)[: max(_TRAIN_PER_LIST * lists * 4, _MIN_TRAIN)])
        index = self._trained_index(self._vectors_at(sample_rows), len(live))
        for start in range(0, len(live), _REGROW_CHUNK):  # the full vectors a chunk at a time
            rows = live[start : start + _REGROW_CHUNK]
            index.add_with_ids(self._vectors_at(rows), rows.astype(np.int64))
        self._index, self._mapped = index, None

    # -- searching --------------------------------------------------------------------------

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        if not self.trained:
            return self._pending.search(queries, k, allowed)
        queries = self._check(queries, k)
        all_keys = self._keys.view
        rows = None  # removed rows are gone from the lists: only a filter restricts
        if allowed is not None:
            rows = rows_of(all_keys, np.asarray(allowed, dtype=np.int64))
            rows = rows[self._alive.view[rows]]
            if scores_allowed_directly(
                len(rows), len(self), up_to=self.exact_below, below_share=_DIRECT_BELOW_SHARE
            ):
                return top_k(inner_products(queries, self._vectors_at(rows)), all_keys[rows], k)
        _, positions = self._search_structure(queries, max(k, self.rescore), rows)
        parts = [
            self._rescore(queries[s : s + _RESCORE_BLOCK], positions[s : s + _RESCORE_BLOCK], k)
            for s in range(0, len(queries), _RESCORE_BLOCK)
        ]
        if not parts:
            return top_k(np.zeros((0, 0), np.float32), all_keys[:0], k)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _rescore(
        self, queries: np.ndarray, positions: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Best ``k`` of ``(Q, C)`` candidate positions (-1: none) by exact inner products
        with their full vectors: ``(Q, k)`` scores and keys, padded as :func:`top_k` pads."""
        found = positions >= 0
        candidates = np.unique(positions[found])
        full = self._vectors_at(candidates)  # each distinct candidate read once
        slots = np.searchsorted(candidates, np.maximum(positions, 0))
        slots = np.minimum(slots, max(len(candidates) - 1, 0))
        exact: np.ndarray = np.full(positions.shape, -np.inf, dtype=np.float32)
        if len(candidates):
            products = np.einsum("qcd,qd->qc", full[slots], queries)
            exact = np.where(found, products, -np.inf).astype(np.float32)
        kk = min(k, positions.shape[1])
        order = np.argsort(-exact, axis=1, kind="stable")[:, :kk]
        out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        out_keys = np.full((len(queries), k), -1, dtype=np.int64)
        best = np.take_along_axis(positions, order, axis=1)
        out_scores[:, :kk] = np.take_along_axis(exact, order, axis=1)
        out_keys[:, :kk] = np.where(best >= 0, self._keys.view[np.maximum(best, 0)], -1)
        return out_scores, out_keys

    def _vectors_at(self, rows: np.ndarray) -> np.ndarray:
        """``(len(rows), dim)`` exact vectors of sorted row positions: read from the source
        (the item store) or the kept copy; never the lossy codes."""
        if not len(rows):
            return np.zeros((0, self.dim), np.float32)
        if self._source is not None:
            return self._source(self._keys.view[rows])
        if self._full is None or len(self._full) != len(self._keys):
            raise RuntimeError("ivfpq: no full vectors to re-score with (attach the item store)")
        gathered: np.ndarray = self._full.view[rows]
        return gathered

    # -- cache: the codes (memory-mapped), keys, and the kept vectors when there is no store --

    def save(self, folder: Path, epoch: str, generation: int) -> None:
        index = self._index
        if index is None:
            return  # untrained: the few pending rows are rebuilt from the store
        arrays = {"keys": self._keys.view, "alive": self._alive.view}
        if self._full is not None:
            arrays["vectors"] = self._full.view
        CacheFiles(folder, self.name, "index").save(
            epoch, generation, lambda path: faiss.write_index(index, str(path)), arrays
        )

    def _accepts(self, index: Any, arrays: dict[str, np.ndarray]) -> bool:
        if index.ntotal != int(arrays["alive"].sum()):  # removed codes left the lists
            return False
        if self._source is not None:
            return True  # re-scores from the store: kept vectors, if saved, are not needed
        vectors = arrays.get("vectors")  # standalone: re-scores with the vectors it saved
        if vectors is None or vectors.shape != (len(arrays["alive"]), self.dim):
            return False
        self._full = GrowableArray.wrapping(vectors)
        return True

    def _compact(self) -> None:
        """Never needed: removal leaves no tombstones in the structure."""


def _default_pq(dim: int) -> int:
    """The largest divisor of ``dim`` up to ``dim / 8``: 8 bits a code byte for 8 dimensions."""
    wanted = max(1, dim // 8)
    return next(m for m in range(wanted, 0, -1) if dim % m == 0)


def _auto_lists(n: int) -> int:
    """A power of two near ``sqrt(n)``, rounded down: 512 lists at 1M, 2,048 at 10M.

    Fewer lists than FAISS's 4-16 sqrt(N) guide: assigning every vector to a list dominates
    the build on one core, and the exact re-scoring recovers the recall lost to coarser lists.
    """
    return int(2 ** max(0, int(math.log2(max(1.0, math.sqrt(n))))))
