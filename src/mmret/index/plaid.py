"""PLAID-style late-interaction search (ColBERTv2/PLAID), built from FAISS parts.

Every document token is stored as the id of its nearest token centroid (k-means,
``faiss.Kmeans``) plus its residual from that centroid, compressed by a FAISS codec (product
quantisation by default: ``token_dim / 4`` sub-vectors of 10 bits, 2.5 bits a dimension, 40
bytes for 128 dimensions; chosen by the recall/size table of ``benchmarks/multivector.py``).
A query is answered in four stages, each on fewer documents:

1. **probe**: per query token, the ``probes`` centroids nearest to it; an inverted list
   (centroid -> documents with a token there) gives every document an approximate score:
   per query token the best probed centroid among its tokens, or, when it has none, the
   lowest probed centroid's score (an upper bound). The best ``candidates`` go on.
2. **centroid interaction**: MaxSim against the candidates' tokens read as their centroids;
   the best ``rescore`` go on.
3. **decompressed**: those documents' tokens are decompressed (centroid + decoded residual)
   and scored by :func:`mmret.late_interaction.maxsim`;
4. **exact**: the best ``refine * k`` of them are re-scored by MaxSim on their full-precision
   vectors, read just in time from the item store (:meth:`VectorIndex.use_stored_vectors`, called by
   the engine; never held in memory), and the best ``k`` returned. Without a store (a bare
   index) or with ``refine=0``, stage 3's best ``k`` are returned.

Until ``train_from`` documents are present there is nothing to cluster: rows are kept as they
are and searched exactly (:class:`~mmret.index.maxsim.MaxSimIndex`). New tokens afterwards take
the existing centroids; :func:`mmret.maintenance.recluster.recluster_index` re-clusters from the
item store when the collection has drifted. Removal tombstones documents (compacted once a
quarter are dead). The cache is the compressed structure (at most 48 bytes a token by
default); the item store stays the truth and keeps every token in float32.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, cast

import faiss as _faiss
import numpy as np

from mmret.errors import InputError
from mmret.index.base import (
    INDEXES,
    VectorIndex,
    VectorSource,
    check_vectors,
    live_rows,
    scores_allowed_directly,
    top_k,
)
from mmret.index.cache import CacheFiles, CacheMissingError
from mmret.index.exact import single_threaded
from mmret.index.maxsim import MaxSimIndex
from mmret.index.plaid_codebook import MAX_CENTROIDS, Codebook, new_codec
from mmret.late_interaction import maxsim

faiss: Any = _faiss  # SWIG stubs disagree with the runtime API

#: Below this share of the documents a filter is answered by decompressing and scoring its
#: documents directly (``scores_allowed_directly``); above it, the stages run restricted to it.
_DIRECT_BELOW_SHARE = 0.05


@INDEXES.register("plaid")
class PlaidIndex(VectorIndex):
    """Approximate MaxSim over ``(N, dim)`` rows of ``dim // token_dim`` tokens each.

    Options: ``centroids`` (0: about ``4 sqrt(tokens)``, a power of two, fixed when first
    trained), ``codec`` (a FAISS factory string for the residual codec, e.g. ``PQ32``,
    ``PQ16``, ``SQ4``; ``auto``: ``PQ{token_dim // 4}x10``), ``probes`` (centroids per query
    token), ``candidates`` (documents kept after probing), ``rescore`` (documents
    decompressed and scored), ``refine`` (``refine * k`` of those re-scored on the stored
    full-precision vectors; 0: none), ``train_from`` (documents needed before clustering),
    ``exact_below`` (a filter allowing at most this many documents scores them directly).
    """

    name = "plaid"
    multi_vector = True

    def __init__(
        self,
        dim: int,
        token_dim: int | None = None,
        centroids: int = 0,
        codec: str = "auto",
        probes: int = 4,
        candidates: int = 1536,
        rescore: int = 384,
        refine: int = 4,
        train_from: int = 1024,
        exact_below: int = 2_000,
    ) -> None:
        super().__init__(dim)
        self._pending = MaxSimIndex(dim, token_dim)  # checks token_dim; holds rows until trained
        self.token_dim = self._pending.token_dim
        self.tokens = dim // self.token_dim
        if not 0 <= centroids <= MAX_CENTROIDS:
            raise InputError(f"centroids must be in [0, {MAX_CENTROIDS}], got {centroids}")
        for option, value in (("probes", probes), ("candidates", candidates)):
            if value < 1:
                raise InputError(f"{option} must be at least 1, got {value}")
        if rescore < 1 or rescore > candidates:
            raise InputError(f"rescore must be in [1, candidates={candidates}], got {rescore}")
        if refine < 0:
            raise InputError(f"refine must be at least 0, got {refine}")
        if train_from < 1:
            raise InputError(f"train_from must be at least 1, got {train_from}")
        self.centroids, self.codec = centroids, codec
        self.probes, self.candidates, self.rescore = probes, candidates, rescore
        self.refine = refine
        self.train_from, self.exact_below = train_from, exact_below
        new_codec(self.codec, self.token_dim)  # a bad codec string fails here, not at training
        self._trained: Codebook | None = None
        self._retry_from = 0  # after a failed training: the document count to try again at
        self._stored: VectorSource | None = None

    def use_stored_vectors(self, source: VectorSource) -> None:
        self._stored = source

    def config(self) -> dict[str, Any]:
        return {
            "token_dim": self.token_dim,
            "centroids": self.centroids,
            "codec": self.codec,
            "probes": self.probes,
            "candidates": self.candidates,
            "rescore": self.rescore,
            "refine": self.refine,
            "train_from": self.train_from,
            "exact_below": self.exact_below,
        }

    @property
    def centroid_count(self) -> int:
        """How many token centroids it has (0 until it holds ``train_from`` documents)."""
        return 0 if self._trained is None else len(self._trained.centroids)

    def __len__(self) -> int:
        return len(self._pending) if self._trained is None else self._trained.live

    def stored_keys(self) -> np.ndarray:
        if self._trained is None:
            return self._pending.stored_keys()
        keys: np.ndarray = self._trained.keys.view[self._trained.alive.view]
        return keys

    @property
    def last_key(self) -> int:
        if self._trained is None:
            return self._pending.last_key
        keys = self._trained.keys.view
        return int(keys[-1]) if len(keys) else -1

    # -- writing --------------------------------------------------------------------------

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        keys = np.asarray(keys, dtype=np.int64)
        check_vectors(self, keys, vectors, self.last_key)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if self._trained is not None:
            self._trained.add(keys, vectors)
            return
        if len(self._pending) + len(keys) < max(self.train_from, self._retry_from):
            self._pending.add(keys, vectors)
            return
        held_keys, held = self._pending.stored_keys(), self._pending.stored_vectors()
        all_keys = np.concatenate([held_keys, keys])
        everything = np.concatenate([held, vectors])
        try:
            trained = Codebook.fit(everything, self.token_dim, self.centroids, self.codec)
        except InputError as error:
            # Too few tokens for the codec asked for: the rows stay searchable exactly (the
            # store has them already) and training is tried again at twice as many.
            self._pending.add(keys, vectors)
            self._retry_from = 2 * len(self._pending)
            message = f"plaid: {error}; searching exactly for now"
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            return
        trained.add(all_keys, everything)
        self._trained, self._pending = trained, MaxSimIndex(self.dim, self.token_dim)

    def remove(self, keys: np.ndarray) -> None:
        if self._trained is None:
            self._pending.remove(keys)
        else:
            self._trained.remove(np.asarray(keys, dtype=np.int64))

    # -- searching ------------------------------------------------------------------------

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        queries = self._check(queries, k)
        trained = self._trained
        if trained is None:
            return self._pending.search(queries, k, allowed)
        all_keys = trained.keys.view
        rows = live_rows(all_keys, trained.alive.view, trained.dead, allowed)
        if rows is None and trained.live <= self.exact_below:
            rows = np.arange(len(all_keys))
        if rows is not None and scores_allowed_directly(
            len(rows), trained.live, up_to=self.exact_below, below_share=_DIRECT_BELOW_SHARE
        ):
            scores = maxsim(queries, trained.decode(rows), self.token_dim)
            if not self._refining:
                return top_k(scores, all_keys[rows], k)
            out = [
                self._exact(query, scores[i], all_keys[rows], k) for i, query in enumerate(queries)
            ]
            return np.stack([s for s, _ in out]), np.stack([key for _, key in out])
        excluded = None
        if rows is not None:
            excluded = np.ones(len(all_keys), dtype=bool)
            excluded[rows] = False
        out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        out_keys = np.full((len(queries), k), -1, dtype=np.int64)
        query_tokens = queries.reshape(len(queries), self.tokens, self.token_dim)
        with single_threaded():
            for row, tokens in enumerate(query_tokens):
                self._search_one(trained, tokens, k, excluded, out_scores[row], out_keys[row])
        return out_scores, out_keys

    def _search_one(
        self,
        trained: Codebook,
        tokens: np.ndarray,
        k: int,
        excluded: np.ndarray | None,
        out_scores: np.ndarray,
        out_keys: np.ndarray,
    ) -> None:
        """Fill ``(k,)`` rows of scores and keys for one query's ``(Tq, token_dim)`` tokens."""
        chosen = self._survivors(trained, tokens, excluded, k)
        if not len(chosen):
            return  # the filter allows nothing: the row stays padded
        scores = maxsim(tokens.reshape(1, -1), trained.decode(chosen), self.token_dim)
        out_scores[:], out_keys[:] = self._exact(
            tokens.reshape(-1), scores[0], trained.keys.view[chosen], k
        )

    @property
    def _refining(self) -> bool:
        return self.refine > 0 and self._stored is not None

    def _exact(
        self, query: np.ndarray, scores: np.ndarray, keys: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(k,)`` best scores and keys of one ``(dim,)`` query among documents ``keys`` with
        decompressed ``scores`` (stage 4): the best ``refine * k`` re-scored on the stored
        vectors when there is a store to read them from."""
        if not self._refining or not len(keys):
            best_scores, best_keys = top_k(scores[None], keys, k)
            return best_scores[0], best_keys[0]
        assert self._stored is not None
        kept = keys[_best_rows(scores, self.refine * k)]
        exact = maxsim(query[None], self._stored(kept), self.token_dim)
        best_scores, best_keys = top_k(exact, kept, k)
        return best_scores[0], best_keys[0]

    def _survivors(
        self, trained: Codebook, tokens: np.ndarray, excluded: np.ndarray | None, k: int
    ) -> np.ndarray:
        """Rows of the documents worth decompressing for one query's ``(Tq, token_dim)``
        tokens: stages 1 and 2 of the module docstring, each keeping at least ``k``."""
        rescore = max(self.rescore, k)
        candidates = max(self.candidates, rescore)
        centroid_scores = tokens @ trained.centroids.T  # (Tq, K)
        approximate = trained.probe_scores(centroid_scores, self.probes)
        if excluded is not None:
            approximate[excluded] = -np.inf
        approximate[~trained.alive.view] = -np.inf
        kept = _best_rows(approximate, candidates)
        interaction = centroid_scores[:, trained.cids.view[kept]]  # (Tq, C, T)
        refined = interaction.max(axis=2).sum(axis=0)
        survivors: np.ndarray = kept[_best_rows(refined, rescore)]
        return survivors

    # -- the cache ------------------------------------------------------------------------

    def save(self, folder: Path, epoch: str, generation: int) -> None:
        """Nothing before training (the few rows are rebuilt from the store on open)."""
        trained = self._trained
        if trained is None:
            return
        codes = trained.codes.view

        def write(path: Path) -> None:
            with path.open("wb") as handle:
                np.save(handle, codes, allow_pickle=False)

        arrays = {
            "keys": trained.keys.view,
            "alive": trained.alive.view,
            "cids": trained.cids.view,
            "centroids": trained.centroids,
            "codec": faiss.serialize_index(trained.codec),
        }
        self._cache(folder).save(epoch, generation, write, arrays)

    def cache_files(self, folder: Path) -> list[Path]:
        return self._cache(folder).files()

    def load(self, folder: Path, epoch: str) -> int | None:
        """Memory-maps the residual codes; the rest (ids, centroids, codec) is read."""
        try:
            cache, mapped = self._cache(folder).load(epoch, _map_codes)
            arrays, codes = cache.arrays, cast(np.ndarray | None, mapped)
            trained = Codebook.restore(
                arrays["centroids"],
                faiss.deserialize_index(arrays["codec"]),
                arrays["keys"],
                arrays["alive"],
                arrays["cids"],
                codes,
            )
        except (CacheMissingError, KeyError, RuntimeError, ValueError):
            return None  # only a cache: rebuilt from the store
        if trained.centroids.shape[1] != self.token_dim or trained.cids.view.shape[1:] != (
            self.tokens,
        ):
            return None
        self._trained, self._pending = trained, MaxSimIndex(self.dim, self.token_dim)
        return cache.generation

    def _cache(self, folder: Path) -> CacheFiles:
        return CacheFiles(folder, self.name, "npy")


def _best_rows(scores: np.ndarray, count: int) -> np.ndarray:
    """Positions of the ``count`` highest finite ``scores`` (fewer when fewer are finite)."""
    finite = int(np.isfinite(scores).sum())
    count = min(count, finite)
    if count == 0:
        return np.empty(0, dtype=np.int64)
    if count < len(scores):
        best: np.ndarray = np.argpartition(-scores, count - 1)[:count]
        return best
    return np.flatnonzero(np.isfinite(scores))


def _map_codes(path: Path) -> np.ndarray:
    codes = np.load(path, mmap_mode="r", allow_pickle=False)
    if codes.dtype != np.uint8 or codes.ndim != 2:
        raise ValueError(f"{path}: not a uint8 matrix")
    return np.asarray(codes)
