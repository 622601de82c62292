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

import math
import warnings
from pathlib import Path
from typing import Any, cast

import faiss as _faiss
import numpy as np

from mmret.errors import InputError
from mmret.index.base import (
    INDEXES,
    GrowableArray,
    VectorIndex,
    VectorSource,
    check_vectors,
    live_rows,
    rows_of,
    scores_allowed_directly,
    top_k,
)
from mmret.index.cache import CacheFiles, CacheMissingError
from mmret.index.exact import single_threaded
from mmret.index.maxsim import MaxSimIndex
from mmret.late_interaction import maxsim

faiss: Any = _faiss  # SWIG stubs disagree with the runtime API

#: Below this share of the documents a filter is answered by decompressing and scoring its
#: documents directly (``scores_allowed_directly``); above it, the stages run restricted to it.
_DIRECT_BELOW_SHARE = 0.05
_MAX_CENTROIDS = 1 << 16  # centroid ids are stored as uint16
_KMEANS_ITERATIONS = 10
#: k-means trains on at most this many tokens per centroid (FAISS recommends 39 to 256).
_TRAIN_PER_CENTROID = 48
#: From this many centroids on, tokens find theirs through an HNSW graph over the centroids
#: rather than by comparing with every one: assigning 3.2 million tokens to 4,096 centroids
#: exactly is 1.7 TFLOP (minutes on one core), the graph is about 50x fewer.
_GRAPH_FROM = 1024
_GRAPH_NEIGHBOURS = 32
_GRAPH_SEARCH = 64
_CODEC_TRAIN_TOKENS = 65_536
_ENCODE_BLOCK = 4096  # documents compressed at a time


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
        if not 0 <= centroids <= _MAX_CENTROIDS:
            raise InputError(f"centroids must be in [0, {_MAX_CENTROIDS}], got {centroids}")
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
        self._trained: _Trained | None = None
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
            trained = _Trained.fit(everything, self.token_dim, self.centroids, self.codec)
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
        trained: _Trained,
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
        self, trained: _Trained, tokens: np.ndarray, excluded: np.ndarray | None, k: int
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
            trained = _Trained.restore(
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


class _Trained:
    """The compressed structure: centroids, codec, and per document its key, liveness, token
    centroid ids ``(N, T)`` uint16 and residual codes ``(N, T * code_size)`` uint8."""

    def __init__(self, centroids: np.ndarray, codec: Any) -> None:
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.codec = codec
        self.code_size = int(codec.sa_code_size())
        self.token_dim = self.centroids.shape[1]
        if len(self.centroids) >= _GRAPH_FROM:
            self.quantizer = faiss.IndexHNSWFlat(
                self.token_dim, _GRAPH_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT
            )
            self.quantizer.hnsw.efSearch = _GRAPH_SEARCH
        else:
            self.quantizer = faiss.IndexFlatIP(self.token_dim)
        self.quantizer.add(self.centroids)
        self.keys = GrowableArray(np.int64)
        self.alive = GrowableArray(np.bool_)
        self.cids: GrowableArray = GrowableArray(np.uint16, 0)
        self.codes: GrowableArray = GrowableArray(np.uint8, 0)
        self.dead = 0
        self._lists: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def fit(cls, vectors: np.ndarray, token_dim: int, centroids: int, codec: str) -> _Trained:
        """Cluster ``(N, T * token_dim)`` rows' tokens and train the residual codec on them."""
        tokens = vectors.reshape(-1, token_dim)
        count = centroids or default_centroids(len(tokens))
        count = max(1, min(count, len(tokens)))
        rng = np.random.default_rng(0)
        sample = tokens[rng.permutation(len(tokens))[: _TRAIN_PER_CENTROID * count]]
        kmeans = faiss.Kmeans(
            token_dim,
            count,
            niter=_KMEANS_ITERATIONS,
            spherical=True,
            seed=1,
            max_points_per_centroid=_TRAIN_PER_CENTROID,
            verbose=False,
        )
        kmeans.train(np.ascontiguousarray(sample))
        codec_sample = sample[:_CODEC_TRAIN_TOKENS]
        trained = cls(kmeans.centroids, new_codec(codec, token_dim, len(codec_sample)))
        nearest = trained.assign(codec_sample)
        try:
            trained.codec.train(codec_sample - trained.centroids[nearest])
        except RuntimeError as error:
            raise InputError(
                f"codec {codec!r} cannot be trained on {len(codec_sample)} residuals "
                f"({_faiss_message(error)}): raise train_from or choose a smaller codec"
            ) from None
        return trained

    @classmethod
    def restore(
        cls,
        centroids: np.ndarray,
        codec: Any,
        keys: np.ndarray,
        alive: np.ndarray,
        cids: np.ndarray,
        codes: np.ndarray | None,
    ) -> _Trained:
        trained = cls(centroids, codec)
        if codes is None or not len(keys) == len(alive) == len(cids) == len(codes):
            raise ValueError("cache arrays disagree")
        if codes.shape[1] != cids.shape[1] * trained.code_size:
            raise ValueError("codes of another size")
        trained.keys, trained.alive = GrowableArray.wrapping(keys), GrowableArray.wrapping(alive)
        trained.cids, trained.codes = GrowableArray.wrapping(cids), GrowableArray.wrapping(codes)
        trained.dead = int((~alive).sum())
        return trained

    @property
    def live(self) -> int:
        return len(self.keys) - self.dead

    def assign(self, tokens: np.ndarray) -> np.ndarray:
        """``(M,)`` nearest centroid of each of ``(M, token_dim)`` tokens."""
        _scores, nearest = self.quantizer.search(np.ascontiguousarray(tokens), 1)
        return cast(np.ndarray, nearest[:, 0])

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        if not len(keys):
            return
        per_doc = vectors.shape[1] // self.token_dim
        if not len(self.cids):  # the widths are known from the first rows
            self.cids = GrowableArray(np.uint16, per_doc)
            self.codes = GrowableArray(np.uint8, per_doc * self.code_size)
        # A block at a time: the residuals of 100,000 documents of 32 x 128 would be 1.6 GB.
        for start in range(0, len(keys), _ENCODE_BLOCK):
            block = vectors[start : start + _ENCODE_BLOCK]
            n = len(block)
            tokens = block.reshape(-1, self.token_dim)
            nearest = self.assign(tokens)
            codes = self.codec.sa_encode(np.ascontiguousarray(tokens - self.centroids[nearest]))
            self.cids.append(nearest.astype(np.uint16).reshape(n, per_doc))
            self.codes.append(codes.reshape(n, per_doc * self.code_size))
        self.keys.append(keys)
        self.alive.append(np.ones(len(keys), dtype=np.bool_))
        self._lists = None

    def remove(self, keys: np.ndarray) -> None:
        rows = rows_of(self.keys.view, keys)
        rows = rows[self.alive.view[rows]]
        if not len(rows):
            return
        alive = self.alive.view
        if not alive.flags.writeable:  # a memory-mapped cache: copy before changing
            self.alive = GrowableArray.wrapping(alive.copy())
        self.alive.view[rows] = False
        self.dead += len(rows)
        if self.dead > len(self.keys) // 4:
            keep = self.alive.view.copy()
            for array in (self.keys, self.alive, self.cids, self.codes):
                array.keep(keep)
            self.dead, self._lists = 0, None

    def decode(self, rows: np.ndarray) -> np.ndarray:
        """``(len(rows), T * token_dim)`` decompressed documents: centroid + residual."""
        if not len(rows):
            return np.zeros((0, self.cids.view.shape[1] * self.token_dim), dtype=np.float32)
        cids = self.cids.view[rows]
        codes = self.codes.view[rows].reshape(-1, self.code_size)
        residuals: np.ndarray = self.codec.sa_decode(np.ascontiguousarray(codes))
        tokens: np.ndarray = self.centroids[cids.ravel()] + residuals
        return tokens.reshape(len(rows), -1)

    def lists(self) -> tuple[np.ndarray, np.ndarray]:
        """The inverted lists: ``(K + 1,)`` offsets into ``(L,)`` document rows, each
        centroid's documents once, ascending (rebuilt after writes, on the next search)."""
        if self._lists is None:
            cids = self.cids.view
            flat = cids.ravel()
            order = np.argsort(flat, kind="stable")  # a radix sort; rows stay ascending
            rows = (order // max(cids.shape[1], 1)).astype(np.int32)
            ids = flat[order]
            first = np.ones(len(order), dtype=bool)
            first[1:] = (ids[1:] != ids[:-1]) | (rows[1:] != rows[:-1])
            ids, rows = ids[first], rows[first]
            offsets = np.searchsorted(ids, np.arange(len(self.centroids) + 1))
            self._lists = (offsets, rows)
        return self._lists

    def probe_scores(self, centroid_scores: np.ndarray, probes: int) -> np.ndarray:
        """``(N,)`` approximate scores (stage 1) from one query's ``(Tq, K)`` centroid scores."""
        offsets, rows = self.lists()
        n_tokens, n_centroids = centroid_scores.shape
        probes = min(probes, n_centroids)
        probed = np.argpartition(-centroid_scores, probes - 1, axis=1)[:, :probes]
        probed_scores = np.take_along_axis(centroid_scores, probed, axis=1)
        # Best first within each query token, so a document's first entry is its best.
        order = np.argsort(-probed_scores, axis=1)
        probed = np.take_along_axis(probed, order, axis=1)
        probed_scores = np.take_along_axis(probed_scores, order, axis=1)
        floor = probed_scores[:, -1]  # a document with no probed centroid: at most this
        starts, lengths = offsets[probed].ravel(), (offsets[probed + 1] - offsets[probed]).ravel()
        total = int(lengths.sum())
        # Every probed list's rows, concatenated: positions start..start+length per list.
        shift = np.repeat(starts - np.cumsum(lengths) + lengths, lengths)
        docs = rows[shift + np.arange(total)].astype(np.int64)
        gains = np.repeat((probed_scores - floor[:, None]).ravel(), lengths)
        token_of = np.repeat(np.arange(n_tokens).repeat(probes), lengths)
        n_docs = len(self.keys)
        # Each (query token, document) pair counts once, with its best gain: its first entry
        # (np.unique's return_index gives first occurrences). Sparse: the entries are a few
        # per cent of the tokens x documents a dense buffer would zero and sum.
        _, first = np.unique(token_of * n_docs + docs, return_index=True)
        approximate: np.ndarray = np.bincount(docs[first], gains[first], minlength=n_docs)
        approximate = approximate.astype(np.float32) + np.float32(floor.sum())
        return approximate


def default_centroids(tokens: int) -> int:
    """About ``4 sqrt(tokens)`` centroids, a power of two, each trained on at least 39 tokens."""
    wanted = max(1.0, min(4 * math.sqrt(tokens), tokens / 39))
    return int(min(_MAX_CENTROIDS, 2 ** math.floor(math.log2(wanted))))


def resolved_codec(codec: str, token_dim: int, training_tokens: int | None = None) -> str:
    """The FAISS factory string ``codec`` stands for: ``auto`` is ``PQ{token_dim // 4}x10``,
    with fewer bits when there are too few ``training_tokens`` for 1,024 codes a sub-vector
    (a small index), and ``SQ8`` when ``token_dim`` is not a multiple of 4."""
    if codec != "auto":
        return codec
    if token_dim % 4:
        return "SQ8"
    bits = 10
    if training_tokens is not None:
        bits = min(10, max(1, int(math.log2(max(training_tokens, 2))) - 2))
    return f"PQ{token_dim // 4}x{bits}"


def new_codec(codec: str, token_dim: int, training_tokens: int | None = None) -> Any:
    """An untrained FAISS residual codec for ``token_dim`` dimensions from a factory string
    (``auto``: ``PQ{token_dim // 4}x10``, 2.5 bits a dimension, when ``token_dim`` allows)."""
    codec = resolved_codec(codec, token_dim, training_tokens)
    try:
        made = faiss.index_factory(token_dim, codec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise InputError(
            f"codec {codec!r} is not a FAISS codec for {token_dim} dimensions "
            f"({_faiss_message(error)})"
        ) from None
    inner = made  # behind a rotation (OPQ), the options are the codec's
    if isinstance(made, faiss.IndexPreTransform):
        inner = faiss.downcast_index(made.index)
    if hasattr(inner, "do_polysemous_training"):
        # Polysemous training reorders PQ codes for Hamming search, which is not used here,
        # and took 64 s of the 65 s training PQ8 on 5,000 residuals.
        inner.do_polysemous_training = False
    if hasattr(inner, "pq"):
        # A small index trains its codec on few residuals, knowingly: no warning on stderr.
        inner.pq.cp.min_points_per_centroid = 1
    return made


def _faiss_message(error: RuntimeError) -> str:
    """The last line of a FAISS error (the first names C++ source locations)."""
    lines = str(error).strip().splitlines()
    return lines[-1] if lines else ""


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
