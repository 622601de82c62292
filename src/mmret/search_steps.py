"""The steps of the one query path, as functions over an opened index folder.

Every caller searches the same way (:meth:`mmret.Retriever.search`, the server, retrieval for
generation, evaluation): queries are encoded by the index's query encoder
(:meth:`~mmret.Retriever.encode_queries`), the first stage takes each query's nearest items
(:func:`first_stage`), the query bank normalises a text or image query's scores
(:func:`discounted`), and a cross-encoder may rerank the top candidates (:func:`rerank_hits`).
:class:`QueryPath` runs them in that order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from mmret.encoders.base import Encoder
from mmret.errors import InputError, UnknownItemError
from mmret.index.filters import Filter
from mmret.index.folder import IndexFolder, KeyedHit
from mmret.items import Item, Query, SearchResult
from mmret.query_bank import POOL, QueryBank, select_query_bank
from mmret.reranker import FirstStage, Reranker, first_stage_name, load_reranker

if TYPE_CHECKING:
    from mmret.heads.cross_encoder import SideTokens

MODALITIES = (None, "text", "image")


def as_queries(queries: Sequence[Query | str]) -> list[Query]:
    """``queries`` as :class:`Query` objects (a string is a text query)."""
    if isinstance(queries, str | Query):
        raise InputError("search takes a list of queries; wrap a single one in [...]")
    return [Query(text=q) if isinstance(q, str) else q for q in queries]


def query_modality(query: Query | Item) -> str | None:
    """The modality of a single-modality query (or item), "text" or "image"; None for an
    image+text one."""
    if query.image is None:
        return "text"
    return "image" if query.text is None else None


def modalities_of(modality: str | Sequence[str | None] | None, count: int) -> list[str | None]:
    """One modality per query vector, from one for all or one each (checked)."""
    modalities = [modality] * count if modality is None or isinstance(modality, str) else modality
    if len(modalities) != count:
        raise InputError(f"{len(modalities)} modalities for {count} query vectors")
    for each in modalities:
        if each not in MODALITIES:
            raise InputError(f"modality must be 'text', 'image' or None, got {each!r}")
    return list(modalities)


def first_stage(
    index: IndexFolder,
    vectors: np.ndarray,
    depth: int,
    filter: Filter | None,
    bank: QueryBank | None,
    modalities: Sequence[str | None],
) -> list[list[KeyedHit]]:
    """The top ``depth`` hits (with store keys) of each query vector; with a ``bank``, the
    top :data:`~mmret.query_bank.POOL` by cosine rescored for each query's modality
    (``"text"``, ``"image"``; None: left as cosines) and cut to ``depth``."""
    if bank is None or not any(modalities):
        return index.search(vectors, depth, filter)[0]
    pooled, stored = index.search(vectors, max(depth, POOL), filter, with_vectors=True)
    return [
        discounted(bank, modality, hits, stored)[:depth]
        for modality, hits in zip(modalities, pooled, strict=True)
    ]


def discounted(
    bank: QueryBank,
    modality: str | None,
    hits: list[KeyedHit],
    stored: dict[int, np.ndarray],
) -> list[KeyedHit]:
    """``hits`` rescored with ``bank``'s discounts of their ``stored`` vectors (by store key)
    for a query of ``modality`` and re-sorted (unchanged for None: an image+text query, the
    bank holds single-modality queries)."""
    if not hits or modality is None:
        return hits
    discounts = bank.discount(np.stack([stored[key] for key, _ in hits]), modality)
    scores = np.array([hit.score for _, hit in hits]) - discounts
    order = np.argsort(-scores, kind="stable")
    return [(hits[i][0], replace(hits[i][1], score=float(scores[i]))) for i in order]


def rerank_hits(
    index: IndexFolder,
    model: Reranker,
    query: SideTokens,
    hits: list[KeyedHit],
    ranker: str,
) -> list[SearchResult]:
    """``hits`` reordered by the reranker's scores (the cross-encoder's, plus the first
    stage's as calibrated for the first stage named ``ranker``), which they then carry."""
    if not hits:
        return []
    documents = index.token_features([key for key, _ in hits])
    first_stage = FirstStage(ranker, np.array([hit.score for _, hit in hits]))
    scores = model.score(query, documents, first_stage)
    order = np.argsort(-scores, kind="stable")
    return [replace(hits[i][1], score=float(scores[i])) for i in order]


class QueryPath:
    """How one opened index answers queries, whoever asks: the steps above in order.

    ``encoder`` gives the index's encoder (loaded on first use: a search by stored vectors
    needs none); ``refined``: its embeddings are refined by a memory (RECO).
    """

    def __init__(
        self, index: IndexFolder, encoder: Callable[[], Encoder], *, refined: bool
    ) -> None:
        self.index = index
        self._encoder = encoder
        self.refined = refined
        self._reranker: Reranker | None = None

    @property
    def query_encoder(self) -> Encoder:
        """See :attr:`mmret.Retriever.query_encoder`."""
        return self._encoder().for_queries()

    def encode(self, queries: Sequence[Query | str]) -> np.ndarray:
        """See :meth:`mmret.Retriever.encode_queries`."""
        return self.query_encoder.encode(as_queries(queries))

    def bank(self, option: QueryBank | bool) -> QueryBank | None:
        """The query bank a search normalises with, or None."""
        return select_query_bank(option, self.index.manifest.encoder, refined=self.refined)

    def search(
        self,
        queries: Sequence[Query | str],
        k: int,
        filter: Filter | None,
        rerank: int,
        reranker: Reranker | None,
        query_bank: QueryBank | bool,
    ) -> list[list[SearchResult]]:
        """See :meth:`mmret.Retriever.search`."""
        if rerank < 0:
            raise InputError(f"rerank must be 0 (off) or a number of candidates, got {rerank}")
        normalised = as_queries(queries)
        vectors = self.encode(normalised)
        bank = self.bank(query_bank)
        modalities = [query_modality(query) for query in normalised]
        first = first_stage(self.index, vectors, max(k, rerank), filter, bank, modalities)
        if not rerank:
            return [[hit for _, hit in hits] for hits in first]
        model = self._reranker_for(reranker)
        sides = model.features(normalised)
        spec = self.index.manifest.encoder
        ranker = first_stage_name(spec, refined=self.refined, query_bank=bank is not None)
        return [
            rerank_hits(self.index, model, sides.take([row]), hits, ranker)[:k]
            for row, hits in enumerate(first)
        ]

    def search_vectors(
        self,
        vectors: np.ndarray,
        k: int,
        filter: Filter | None,
        modality: str | Sequence[str | None] | None,
        query_bank: QueryBank | bool,
    ) -> list[list[SearchResult]]:
        """See :meth:`mmret.Retriever.search_vectors`."""
        modalities = modalities_of(modality, len(vectors))
        bank = self.bank(query_bank) if any(modalities) else None
        first = first_stage(self.index, vectors, k, filter, bank, modalities)
        return [[hit for _, hit in hits] for hits in first]

    def similar(
        self, ids: Sequence[str], k: int, filter: Filter | None
    ) -> list[list[SearchResult]]:
        """See :meth:`mmret.Retriever.similar`."""
        if isinstance(ids, str):
            raise InputError("similar takes a list of ids; wrap a single one in [...]")
        with self.index.snapshot():  # the vectors and the search agree
            found = self.index.lookup(ids)
            missing = [id_ for id_ in ids if id_ not in found]
            if missing:
                raise UnknownItemError(f"no item with id {missing[0]!r} in {self.index.folder}")
            if not ids:
                return []
            vectors = np.stack([found[id_][1] for id_ in ids])
            hits = self.search_vectors(vectors, k + 1, filter, None, True)
        return [
            [hit for hit in row if hit.id != id_][:k] for id_, row in zip(ids, hits, strict=True)
        ]

    def _reranker_for(self, reranker: Reranker | None) -> Reranker:
        spec = self.index.token_spec
        if reranker is None:
            if self._reranker is None:
                own = self._encoder() if spec is not None else None
                reranker = load_reranker()
                if own is not None and own.layer_source == reranker.spec.source:
                    reranker = reranker.with_backbone(own)  # share the loaded towers
                self._reranker = reranker
            reranker = self._reranker
        reranker.check_index(spec, self.index.folder)
        return reranker
