"""The Retriever: one object that encodes, stores and searches; the CLI and server call it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmret._closing import Closing
from mmret.adding import AddReport, ItemWriter
from mmret.encoders import DEFAULT_MODEL, Encoder, load_encoder
from mmret.errors import InputError
from mmret.index.filters import Filter
from mmret.index.folder import IndexFolder, refuse_existing
from mmret.index.manifest import IndexManifest, read_manifest
from mmret.index.store import StoredItem
from mmret.ingest.report import SkipReport
from mmret.items import Item, Query, SearchResult
from mmret.memory.refine import Refiner, refiner_for_index
from mmret.query_bank import QueryBank
from mmret.search_steps import QueryPath

if TYPE_CHECKING:
    from mmret.reranker import Reranker, TokenFeatureSpec

__all__ = ["AddReport", "Retriever", "SearchResult"]


class Retriever(Closing):
    """An index folder opened for search (and, unless read-only, for adding and removing).

    >>> import mmret
    >>> with mmret.Retriever.create("photos.mmret") as retriever:      # doctest: +SKIP
    ...     retriever.add(mmret.read_items("photos/"))
    ...     hits = retriever.search(["a dog on a beach"], k=5)[0]
    """

    def __init__(
        self,
        index: IndexFolder,
        *,
        encoder: Encoder | None = None,
        refiner: Refiner | None = None,
    ) -> None:
        self.index, self.folder, self.manifest = index, index.folder, index.manifest
        self.readonly = index.readonly
        self.refiner = refiner
        self._owns_refiner = False  # set by open() for a memory it reopened itself
        self._encoder = encoder if refiner is None or encoder is None else refiner.wrap(encoder)
        refined = refiner is not None
        self._writer = ItemWriter(index, lambda: self.encoder, refined=refined)
        self._queries = QueryPath(index, lambda: self.encoder, refined=refined)

    @classmethod
    def create(
        cls,
        folder: str | Path,
        *,
        model: str = DEFAULT_MODEL,
        encoder: Encoder | None = None,
        backend: str = "auto",
        backend_options: dict[str, Any] | None = None,
        refiner: Refiner | None = None,
        token_features: TokenFeatureSpec | None = None,
    ) -> Retriever:
        """Create an empty index folder for ``model`` (or an already built ``encoder``).

        With a ``refiner`` (:func:`mmret.memory.load_refiner`), items and queries are refined
        with its memory (RECO), and the index records which memory and fusion it was built with.
        With ``token_features`` (``load_reranker().spec`` for the shipped reranker), every item's
        token features are stored beside it, so searches can rerank (``search(rerank=N)``).
        The folder is built aside and renamed into place, so a crash leaves no half-made index.
        """
        folder = refuse_existing(Path(folder))  # before a model loads for nothing
        encoder = encoder or load_encoder(model)
        manifest = IndexManifest(
            encoder.spec,
            encoder.dim,
            backend,
            dict(backend_options or {}),
            refiner.record() if refiner is not None else None,
            encoder.token_dim,
            token_features.to_dict() if token_features is not None else None,
        )
        IndexFolder.create(folder, manifest)
        return cls.open(folder, encoder=encoder, refiner=refiner)

    @classmethod
    def open(
        cls,
        folder: str | Path,
        *,
        readonly: bool = False,
        encoder: Encoder | None = None,
        wait: float = 10.0,
        refiner: Refiner | None = None,
    ) -> Retriever:
        """Open an existing index; its encoder is loaded the first time something is encoded.

        Any number of readers may have an index open while one writer adds to it; a second
        writer waits up to ``wait`` seconds for the first to close, then fails clearly.
        An index built with a memory reopens it from the recorded path unless ``refiner`` is
        given, and refuses a ``refiner`` with another memory, fusion or options.
        """
        folder = Path(folder)
        manifest = read_manifest(folder)
        if encoder is not None and encoder.spec != manifest.encoder:
            raise InputError(
                f"{folder} was built with encoder {manifest.encoder!r}, not {encoder.spec!r}"
            )
        owns_refiner = refiner is None and manifest.refiner is not None
        refiner = refiner_for_index(folder, manifest.refiner, refiner)
        try:
            index = IndexFolder.open(folder, readonly=readonly, wait=wait, manifest=manifest)
        except BaseException:
            if owns_refiner and refiner is not None:
                refiner.close()
            raise
        retriever = cls(index, encoder=encoder, refiner=refiner)
        retriever._owns_refiner = owns_refiner
        return retriever

    def close(self) -> None:
        """Save the backend's cache if writes made it stale, and release the index."""
        try:
            self.index.close()
        finally:
            if self._owns_refiner and self.refiner is not None:
                self.refiner.close()
                self._owns_refiner = False

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            encoder = load_encoder(self.manifest.encoder)
            self._encoder = encoder if self.refiner is None else self.refiner.wrap(encoder)
        return self._encoder

    @property
    def backend_name(self) -> str:
        return self.index.backend.name

    def __len__(self) -> int:
        return len(self.index)

    def add(
        self,
        items: Iterable[Item],
        *,
        vectors: np.ndarray | None = None,
        report: SkipReport | None = None,
        show_progress: bool = False,
        total: int | None = None,
    ) -> AddReport:
        """Encode and store items, one transaction per chunk of 256.

        Items whose id is already indexed, or whose image cannot be decoded, are skipped and
        reported in the result (or in ``report``, when given); so are the entries that
        :func:`~mmret.read_items` skips, when ``items`` is what it returned. With ``vectors``,
        the ``(N, dim)`` unit vectors this index's encoder made of ``items`` elsewhere (the
        shards of :mod:`mmret.scaleout.ray_encode`), nothing is encoded.
        """
        if vectors is not None:
            return self._writer.add_encoded(list(items), vectors, report or SkipReport())
        return self._writer.add(items, report, show_progress, total)

    def add_vectors(self, items: Sequence[Item], vectors: np.ndarray) -> None:
        """Store items with embeddings computed elsewhere: ``(N, dim)``, one row per item.

        The vectors must come from this index's encoder (or one with the same space), and are
        L2-normalised here (each token, for a multi-vector model). Unlike :meth:`add`, a
        duplicate id is an error, not a skip.
        """
        self._writer.add_vectors(items, vectors)

    def flush(self) -> None:
        """Save the backend's cache (FAISS) for the current state, so the next open is fast.

        Every write is durable the moment it returns; the cache only spares the next reader
        work. :meth:`close` calls it."""
        self.index.flush()

    def remove(self, ids: Sequence[str]) -> int:
        """Remove items by id; returns how many existed."""
        if isinstance(ids, str):
            raise InputError("remove takes a list of ids; wrap a single one in [...]")
        return self.index.remove(ids)

    @property
    def token_spec(self) -> TokenFeatureSpec | None:
        """The token features stored beside the items, if any."""
        return self.index.token_spec

    def search(
        self,
        queries: Sequence[Query | str],
        *,
        k: int = 10,
        filter: Filter | None = None,
        rerank: int = 0,
        reranker: Reranker | None = None,
        query_bank: QueryBank | bool = True,
    ) -> list[list[SearchResult]]:
        """The ``k`` best items for each query (a string is a text query), best first.

        ``query_bank``: scores of a text or an image query are normalised with a query bank
        (:mod:`mmret.query_bank`: each item's cosine minus a discount for being close to
        many typical queries), by default with the bank that ships for the index's model
        (``starter-v3``, ``starter-v4``; none for others or memory-refined indexes); ``False`` turns
        it off, a :class:`~mmret.query_bank.QueryBank` of this model uses that one.

        With ``rerank=N``, the first stage's top ``max(N, k)`` are rescored by a cross-encoder
        (``reranker``, default the shipped one) reading the query's and each candidate's token
        features (stored beside the items: an index created with ``token_features``); hits are
        those candidates reordered, and their scores the reranker's: the cross-encoder's, plus
        the first stage's times the weight the reranker was calibrated with for this index's
        model (``mmret train rerank-calibrate``; none for other models).
        """
        return self._queries.search(queries, k, filter, rerank, reranker, query_bank)

    @property
    def query_encoder(self) -> Encoder:
        """The encoder of queries: :attr:`encoder`, or its query side where queries and
        documents have separate models (ReT). Anything that encodes a query to search this
        index with (the server's batcher, retrieval for generation) uses this one."""
        return self._queries.query_encoder

    def encode_queries(self, queries: Sequence[Query | str]) -> np.ndarray:
        """``(Q, dim)`` query vectors (a string is a text query), as :meth:`search` encodes
        them: give them to :meth:`search_vectors` with each query's :func:`query_modality`
        to get the same hits as :meth:`search` without reranking."""
        return self._queries.encode(queries)

    def search_vectors(
        self,
        vectors: np.ndarray,
        *,
        k: int = 10,
        filter: Filter | None = None,
        modality: str | Sequence[str | None] | None = None,
        query_bank: QueryBank | bool = True,
    ) -> list[list[SearchResult]]:
        """Like :meth:`search` for ``(Q, dim)`` query vectors (from :meth:`encode_queries`, or
        stored vectors for "more like this"). They are L2-normalised here, each token for a
        multi-vector model, so scores are cosine similarities or sums of them. Vectors of text
        or image queries (``modality`` "text" or "image", one for all or one per query) are
        normalised with the query bank as :meth:`search` normalises them; None: cosines."""
        return self._queries.search_vectors(vectors, k, filter, modality, query_bank)

    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        """Those of ``ids`` that are in the index."""
        return self.index.existing_ids(ids)

    def ids(self) -> list[str]:
        """Every stored item's id, oldest first."""
        return self.index.ids()

    def stored_vectors(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        """The ``(dim,)`` vector stored for each of ``ids`` still in the index (for example,
        to compare search hits with each other)."""
        return self.index.stored_vectors(ids)

    def get(self, ids: Sequence[str]) -> dict[str, StoredItem]:
        """What is stored for each of ``ids`` that is in the index (absent ids are left out)."""
        if isinstance(ids, str):
            raise InputError("get takes a list of ids; wrap a single one in [...]")
        return self.index.get(ids)

    def similar(
        self, ids: Sequence[str], *, k: int = 10, filter: Filter | None = None
    ) -> list[list[SearchResult]]:
        """ "More like this": the ``k`` items nearest to each stored item of ``ids`` (searched
        with its stored vector, so nothing is re-encoded), the item itself left out."""
        return self._queries.similar(ids, k, filter)

    def info(self) -> dict[str, Any]:
        """What ``mmret info`` prints: the folder, item count, encoder, backend, memory."""
        return self.index.info()
