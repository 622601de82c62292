"""PLAID's compressed structure: token centroids (k-means), a residual codec, and per document
its centroid ids and residual codes, with the inverted lists that the search probes."""

from __future__ import annotations

import math
from typing import Any, cast

import faiss as _faiss
import numpy as np

from mmret.errors import InputError
from mmret.index.base import GrowableArray, rows_of

faiss: Any = _faiss  # SWIG stubs disagree with the runtime API

MAX_CENTROIDS = 1 << 16  # centroid ids are stored as uint16
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


class Codebook:
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
    def fit(cls, vectors: np.ndarray, token_dim: int, centroids: int, codec: str) -> Codebook:
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
    ) -> Codebook:
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
    return int(min(MAX_CENTROIDS, 2 ** math.floor(math.log2(wanted))))


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
