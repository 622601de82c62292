"""The Retriever: one object that encodes, stores and searches; the CLI and server call it."""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from mmret._files import build_folder
from mmret._progress import progress
from mmret.encoders import DEFAULT_MODEL, Encoder, load_encoder
from mmret.errors import ImageLoadError, IndexFormatError, InputError, UnknownItemError
from mmret.index.base import VectorIndex, new_backend
from mmret.index.columns import MetadataColumns
from mmret.index.filters import Filter
from mmret.index.lock import WriterLock
from mmret.index.manifest import (
    ITEMS_FILE,
    IndexManifest,
    manifest_text,
    read_manifest,
    write_manifest,
)
from mmret.index.store import ItemStore, StoredItem
from mmret.index.token_store import TokenFiles
from mmret.ingest.report import SkipReport
from mmret.ingest.sources import ItemSource
from mmret.items import Item, Query
from mmret.late_interaction import normalise_tokens
from mmret.query_bank import POOL, QueryBank, select_query_bank

if TYPE_CHECKING:
    from mmret.heads.rerank import SideTokens
    from mmret.memory.refine import Refiner
    from mmret.reranker import Reranker, TokenFeatureSpec

ADD_CHUNK = 256


@dataclass(frozen=True)
class SearchResult:
    """One hit: the item's id, its score (cosine similarity, minus the query bank's discount
    where a search normalises with one; for a multi-vector model the MaxSim sum over the
    query's tokens; after reranking the reranker's score), and what was stored with it."""

    id: str
    score: float
    text: str | None = None
    image: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "score": self.score,
            "image": self.image,
            "text": self.text,
            "metadata": self.metadata,
        }


@dataclass
class AddReport:
    """What an :meth:`Retriever.add` call did: items added and what was skipped, with reasons."""

    added: int = 0
    skipped: SkipReport = field(default_factory=SkipReport)


class Retriever:
    """An index folder opened for search (and, unless read-only, for adding and removing).

    >>> import mmret
    >>> with mmret.Retriever.create("photos.mmret") as retriever:      # doctest: +SKIP
    ...     retriever.add(mmret.read_items("photos/"))
    ...     hits = retriever.search(["a dog on a beach"], k=5)[0]
    """

    def __init__(
        self,
        folder: Path,
        manifest: IndexManifest,
        store: ItemStore,
        *,
        encoder: Encoder | None = None,
        readonly: bool = False,
        lock: WriterLock | None = None,
        refiner: Refiner | None = None,
    ) -> None:
        self.folder = folder
        self.manifest = manifest
        self.readonly = readonly
        self._store = store
        self.refiner = refiner
        self._owns_refiner = False  # set by open() for a memory it reopened itself
        self._encoder = encoder if refiner is None or encoder is None else refiner.wrap(encoder)
        self._writer_lock = lock
        # One connection serves every thread: calls take turns so transactions never mix.
        self._mutex = threading.RLock()
        self._columns = MetadataColumns()
        self._tokens = self._token_files()
        self._token_backend: Encoder | None = None
        self._reranker: Reranker | None = None
        self._backend, self._generation = self._load_backend()

    # -- opening --------------------------------------------------------------------------

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
        folder = Path(folder)
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise InputError(f"{folder}: already exists and is not empty")
        encoder = encoder or load_encoder(model)
        manifest = IndexManifest(
            encoder=encoder.spec,
            dim=encoder.dim,
            backend=backend,
            backend_options=dict(backend_options or {}),
            refiner=refiner.record() if refiner is not None else None,
            token_dim=encoder.token_dim,
            token_features=token_features.to_dict() if token_features is not None else None,
        )
        try:  # fail on a bad backend or option before creating anything
            new_backend(backend, manifest.backend_options, manifest.dim, 0, manifest.token_dim)
        except TypeError as error:
            raise InputError(f"backend {backend!r}: bad options ({error})") from None
        folder.parent.mkdir(parents=True, exist_ok=True)
        with build_folder(folder) as scratch:
            store = ItemStore(scratch / ITEMS_FILE, manifest.dim, create=True)
            store.record_manifest(manifest_text(manifest))
            if token_features is not None:
                store.create_tokens_table()
            store.close()
            write_manifest(scratch, manifest)
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
        if refiner is not None or manifest.refiner is not None:
            from mmret.memory.refine import refiner_for_index  # the memory is built on Retriever

            refiner = refiner_for_index(folder, manifest.refiner, refiner)
        lock = None
        if not readonly:
            lock = WriterLock(folder)
            lock.acquire(wait)
        store = None
        try:
            store = ItemStore(folder / ITEMS_FILE, manifest.dim, readonly=readonly)
            retriever = cls(
                folder,
                manifest,
                store,
                encoder=encoder,
                readonly=readonly,
                lock=lock,
                refiner=refiner,
            )
            retriever._owns_refiner = owns_refiner
            return retriever
        except BaseException:
            if owns_refiner and refiner is not None:
                refiner.close()
            if store is not None:
                store.close()
            if lock is not None:
                lock.release()
            raise

    def close(self) -> None:
        """Save the backend's cache if writes made it stale, and release the index."""
        with self._mutex:
            try:
                if self._writer_lock is not None:
                    self.flush()
            finally:
                self._store.close()
                self._backend.close()
                if self._owns_refiner and self.refiner is not None:
                    self.refiner.close()
                    self._owns_refiner = False
                if self._writer_lock is not None:
                    self._writer_lock.release()
                    self._writer_lock = None

    def __enter__(self) -> Retriever:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            encoder = load_encoder(self.manifest.encoder)
            self._encoder = encoder if self.refiner is None else self.refiner.wrap(encoder)
        return self._encoder

    @property
    def backend_name(self) -> str:
        return self._backend.name

    def __len__(self) -> int:
        with self._mutex:
            return len(self._store)

    def _load_backend(self) -> tuple[VectorIndex, int]:
        """The vector backend for the store's current state, and that state's generation.

        A cache saved a few writes ago is brought up to date with the changes since, rather
        than rebuilt: after a crash, or in a reader while a writer adds, opening stays cheap.
        """
        with self._store.snapshot():
            generation, epoch = self._store.generation, self._store.epoch
            count = self._store.recorded_count  # counting the rows would read the table
            backend = self._new_backend(count)
            cached = backend.load(self.folder, epoch)
            if cached is not None and cached <= generation:
                self._catch_up(backend, cached)
                if len(backend) != count:
                    # The cache lost entries its record stands for (Milvus Lite killed while
                    # writing can lose rows it had acknowledged): rebuilt from the store.
                    backend.close()
                    backend, cached = self._new_backend(count), None
            if cached is None or cached > generation:
                with contextlib.closing(self._store.vector_chunks()) as chunks:  # ends its read
                    backend.build(chunks, count)
                cached = -1
            elif backend.cache_outdated:
                cached = -1  # a writer's flush saves it in the current layout
        self._epoch = epoch
        self._saved_generation = cached  # what the cache file holds: flush() rewrites it
        return backend, generation

    def _new_backend(self, count: int) -> VectorIndex:
        """An empty backend of the manifest's kind, sized for ``count`` items, reading the
        store's vectors."""
        manifest = self.manifest
        backend = new_backend(
            manifest.backend, manifest.backend_options, manifest.dim, count, manifest.token_dim
        )
        backend.use_stored_vectors(self._store.vectors_at)
        return backend

    def _catch_up(self, backend: VectorIndex, since: int) -> None:
        keys, vectors, removed = self._store.changes_since(since, backend.last_key)
        backend.remove(removed)
        backend.add(keys, vectors)

    def _current_backend(self) -> VectorIndex:
        """Inside a store snapshot: the backend, updated if another process wrote since."""
        generation = self._store.generation
        if generation != self._generation:
            self._catch_up(self._backend, self._generation)
            self._generation = generation
        return self._backend

    # -- writing --------------------------------------------------------------------------

    def add(
        self,
        items: Iterable[Item],
        *,
        report: SkipReport | None = None,
        show_progress: bool = False,
        total: int | None = None,
    ) -> AddReport:
        """Encode and store items, one transaction per chunk of 256.

        Items whose id is already indexed, or whose image cannot be decoded, are skipped and
        reported in the result (or in ``report``, when given); so are the entries that
        :func:`~mmret.read_items` skips, when ``items`` is what it returned.
        """
        self._writable()
        result = AddReport(skipped=report if report is not None else SkipReport())
        if isinstance(items, ItemSource):
            items = items.read(result.skipped)
        chunks = _chunks(items, ADD_CHUNK)
        n_chunks = None if total is None else -(-total // ADD_CHUNK)
        with ThreadPoolExecutor(max_workers=2) as pool:
            for chunk in progress(
                chunks, total=n_chunks, description="Indexing", enabled=show_progress
            ):
                result.added += self._add_chunk(chunk, result.skipped, pool)
        return result

    def _add_chunk(self, chunk: list[Item], report: SkipReport, pool: ThreadPoolExecutor) -> int:
        with self._mutex:
            existing = self._store.existing_ids([item.id for item in chunk])
        fresh = []
        for item in chunk:
            if item.id in existing:
                report.skip(f"{item.id}: already in the index")
            else:
                fresh.append(item)
                existing.add(item.id)
        contents, stored, vectors = encode_items(self.encoder, fresh, report, pool)
        if not stored:
            return 0
        return self._store_encoded(stored, vectors, report, self._token_features(contents))

    def add_encoded(self, items: Sequence[Item], vectors: np.ndarray, report: SkipReport) -> int:
        """Store items whose ``(N, dim)`` vectors this index's encoder made elsewhere (the
        shards of :mod:`mmret.ingest.ray_encode`), as they are: like :meth:`add`, ids already
        present are skipped into ``report``. Returns how many were stored."""
        self._writable()
        if self.token_spec is not None or self.refiner is not None:
            raise InputError(
                f"{self.folder} refines its embeddings with a memory or stores token features "
                "for reranking, which are computed while adding; add its items with add()"
            )
        stored = [StoredItem(i.id, i.text, i.image_path, dict(i.metadata)) for i in items]
        return self._store_encoded(stored, np.asarray(vectors, dtype=np.float32), report, None)

    def _store_encoded(
        self,
        stored: list[StoredItem],
        vectors: np.ndarray,
        report: SkipReport,
        tokens: SideTokens | None,
    ) -> int:
        with self._mutex:  # another thread may have added some of these ids meanwhile
            taken = self._store.existing_ids([item.id for item in stored])
            keep = [item.id not in taken for item in stored]
            for row, kept in zip(stored, keep, strict=True):
                if not kept:
                    report.skip(f"{row.id}: already in the index")
            stored = [item for item, kept in zip(stored, keep, strict=True) if kept]
            if stored:
                kept_tokens = None if tokens is None else tokens.take(torch.tensor(keep))
                self._insert(stored, vectors[np.asarray(keep)], kept_tokens)
        return len(stored)

    def add_vectors(self, items: Sequence[Item], vectors: np.ndarray) -> None:
        """Store items with embeddings computed elsewhere: ``(N, dim)``, one row per item.

        The vectors must come from this index's encoder (or one with the same space), and are
        L2-normalised here (each token, for a multi-vector model). Unlike :meth:`add`, a
        duplicate id is an error, not a skip.
        """
        self._writable()
        vectors = np.asarray(vectors, dtype=np.float32)
        expected = (len(items), self.manifest.dim)
        if vectors.shape != expected:
            raise InputError(f"expected vectors of shape {expected}, got {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise InputError("vectors contain NaN or infinite values")
        ids = [item.id for item in items]
        repeated = {i for i, n in Counter(ids).items() if n > 1}
        stored = [StoredItem(i.id, i.text, i.image_path, dict(i.metadata)) for i in items]
        with self._mutex:
            clashes = self._store.existing_ids(ids) | repeated
            if clashes:
                raise InputError(f"ids already present or repeated: {sorted(clashes)[:5]}")
            self._insert(
                stored,
                normalise_tokens(vectors, self.manifest.token_dim),
                self._token_features(items),
            )

    def _insert(
        self, stored: list[StoredItem], vectors: np.ndarray, tokens: SideTokens | None = None
    ) -> None:
        with self._mutex:
            # Token bytes reach the disk before the transaction that refers to them commits.
            refs = None if tokens is None or self._tokens is None else self._tokens.append(tokens)
            keys = self._store.add(stored, vectors, refs)
            self._backend.add(keys, vectors)
            self._generation = self._store.generation  # ours alone: we hold the writer lock

    def flush(self) -> None:
        """Save the backend's cache (FAISS) for the current state, so the next open is fast.

        Every write is durable the moment it returns; the cache only spares the next reader
        work (a reader catches up from an older cache by applying the changes since).
        :meth:`close` calls it. A cache that cannot be written (a full disk) is a warning,
        not an error: it is removed, and rebuilt from the items when next needed.
        """
        with self._mutex:
            if self._saved_generation == self._generation:
                return
            try:
                self._backend.save(self.folder, self._epoch, self._generation)
            except OSError as error:
                for cache in self._backend.cache_files(self.folder):
                    cache.unlink(missing_ok=True)
                warnings.warn(
                    f"{self.folder}: could not save the {self._backend.name} cache ({error}); "
                    "it is rebuilt from the stored items when next needed",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self._saved_generation = self._generation

    def remove(self, ids: Sequence[str]) -> int:
        """Remove items by id; returns how many existed."""
        if isinstance(ids, str):
            raise InputError("remove takes a list of ids; wrap a single one in [...]")
        self._writable()
        with self._mutex:
            keys = self._store.remove(list(ids))
            self._backend.remove(keys)
            self._generation = self._store.generation
        return len(keys)

    def _writable(self) -> None:
        if self.readonly:
            raise IndexFormatError(f"{self.folder}: opened read-only")
        if self._writer_lock is None:
            raise IndexFormatError(f"{self.folder}: closed")

    # -- token features for reranking -----------------------------------------------------

    @property
    def token_spec(self) -> TokenFeatureSpec | None:
        """The token features stored beside the items, if any."""
        from mmret.reranker import TokenFeatureSpec

        stored = self.manifest.token_features
        return None if stored is None else TokenFeatureSpec.from_dict(stored)

    def _token_files(self) -> TokenFiles | None:
        spec = self.token_spec
        return None if spec is None else TokenFiles(self.folder, spec)

    def _token_features(self, contents: Sequence[Query | Item]) -> SideTokens | None:
        """Token features of items about to be stored (None: the index stores none)."""
        spec = self.token_spec
        if spec is None:
            return None
        from mmret.reranker import token_features

        if self._token_backend is None:
            own = self.encoder if self.encoder.layer_source == spec.source else None
            self._token_backend = own or load_encoder(spec.backbone)
        return token_features(self._token_backend, spec, contents)

    def _reranker_for(self, reranker: Reranker | None) -> Reranker:
        from mmret.reranker import load_reranker

        if reranker is None:
            if self._reranker is None:
                own = self.encoder if self.token_spec is not None else None
                reranker = load_reranker()
                if own is not None and own.layer_source == reranker.spec.source:
                    reranker = reranker.with_backbone(own)  # share the loaded towers
                self._reranker = reranker
            reranker = self._reranker
        reranker.check_index(self.token_spec, self.folder)
        return reranker

    # -- searching ------------------------------------------------------------------------

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
        (``starter-v3``; none for other models or memory-refined indexes); ``False`` turns
        it off, a :class:`~mmret.query_bank.QueryBank` of this model uses that one.

        With ``rerank=N``, the first stage's top ``max(N, k)`` are rescored by a cross-encoder
        (``reranker``, default the shipped one) reading the query's and each candidate's token
        features (stored beside the items: an index created with ``token_features``); hits are
        those candidates reordered, and their scores the reranker's: the cross-encoder's, plus
        the first stage's times the weight the reranker was calibrated with for this index's
        model (``mmret train rerank-calibrate``; none for other models).
        """
        if rerank < 0:
            raise InputError(f"rerank must be 0 (off) or a number of candidates, got {rerank}")
        normalised = as_queries(queries)
        vectors = self.encode_queries(normalised)
        bank = self._query_bank(query_bank)
        modalities = [query_modality(query) for query in normalised]
        first = self._first_stage(vectors, max(k, rerank), filter, bank, modalities)
        if not rerank:
            return [[hit for _, hit in hits] for hits in first]
        model = self._reranker_for(reranker)
        sides = model.features(normalised)
        return [
            self._rerank(model, sides.take([row]), hits, bank is not None)[:k]
            for row, hits in enumerate(first)
        ]

    @property
    def query_encoder(self) -> Encoder:
        """The encoder of queries: :attr:`encoder`, or its query side where queries and
        documents have separate models (ReT). Anything that encodes a query to search this
        index with (the server's batcher, retrieval for generation) uses this one."""
        return self.encoder.for_queries()

    def encode_queries(self, queries: Sequence[Query | str]) -> np.ndarray:
        """``(Q, dim)`` query vectors (a string is a text query), as :meth:`search` encodes
        them: give them to :meth:`search_vectors` with each query's :func:`query_modality`
        to get the same hits as :meth:`search` without reranking."""
        return self.query_encoder.encode(as_queries(queries))

    def _query_bank(self, option: QueryBank | bool) -> QueryBank | None:
        """The query bank a search normalises with (see :meth:`search`), or None."""
        return select_query_bank(option, self.encoder.spec, refined=self.refiner is not None)

    def _first_stage(
        self,
        vectors: np.ndarray,
        depth: int,
        filter: Filter | None,
        bank: QueryBank | None,
        modalities: Sequence[str | None],
    ) -> list[list[tuple[int, SearchResult]]]:
        """The top ``depth`` hits (with store keys) of each query vector; with a ``bank``, the
        top :data:`~mmret.query_bank.POOL` by cosine rescored for each query's modality
        (``"text"``, ``"image"``; None: left as cosines) and cut to ``depth``."""
        if bank is None or not any(modalities):
            return self._search_keys(vectors, depth, filter)[0]
        pooled, stored = self._search_keys(vectors, max(depth, POOL), filter, with_vectors=True)
        return [
            discounted(bank, modality, hits, stored)[:depth]
            for modality, hits in zip(modalities, pooled, strict=True)
        ]

    def _rerank(
        self,
        model: Reranker,
        query: SideTokens,
        hits: list[tuple[int, SearchResult]],
        query_bank: bool,
    ) -> list[SearchResult]:
        """``hits`` reordered by the reranker's scores (the cross-encoder's, plus the first
        stage's as calibrated for this index's model and ``query_bank`` normalisation), which
        they then carry."""
        if not hits:
            return []
        assert self._tokens is not None  # check_index refused an index without token features
        keys = [key for key, _ in hits]
        with self._mutex:
            refs = self._store.token_refs(keys)
        missing = [hit.id for key, hit in hits if key not in refs]
        if missing:
            raise IndexFormatError(
                f"{self.folder}: no stored token features for {missing[:5]} "
                "(run `mmret check` and `mmret repair`)"
            )
        from mmret.reranker import FirstStage, first_stage_name

        ranker = first_stage_name(
            self.encoder.spec, refined=self.refiner is not None, query_bank=query_bank
        )
        first_stage = FirstStage(ranker, np.array([hit.score for _, hit in hits]))
        scores = model.score(query, self._tokens.read([refs[key] for key in keys]), first_stage)
        order = np.argsort(-scores, kind="stable")
        return [replace(hits[i][1], score=float(scores[i])) for i in order]

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
        modalities = (
            [modality] * len(vectors) if modality is None or isinstance(modality, str) else modality
        )
        if len(modalities) != len(vectors):
            raise InputError(f"{len(modalities)} modalities for {len(vectors)} query vectors")
        for each in modalities:
            if each not in (None, "text", "image"):
                raise InputError(f"modality must be 'text', 'image' or None, got {each!r}")
        bank = self._query_bank(query_bank) if any(modalities) else None
        first = self._first_stage(vectors, k, filter, bank, modalities)
        return [[hit for _, hit in hits] for hits in first]

    def _search_keys(
        self, vectors: np.ndarray, k: int, filter: Filter | None, *, with_vectors: bool = False
    ) -> tuple[list[list[tuple[int, SearchResult]]], dict[int, np.ndarray]]:
        """:meth:`search_vectors`' hits with each item's store key, and with ``with_vectors``
        the hits' stored vectors by key, read in the same snapshot."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if (
            vectors.ndim == 2
            and vectors.shape[1] == self.manifest.dim
            and np.isfinite(vectors).all()
        ):
            # malformed input is left for the backend to name
            vectors = normalise_tokens(vectors, self.manifest.token_dim)
        # One snapshot: the vectors searched, the filter and the rows returned agree even while
        # another process writes.
        with self._mutex, self._store.snapshot():
            allowed = self._columns.matching_keys(self._store, filter) if filter else None
            scores, keys = self._current_backend().search(vectors, k, allowed)
            rows = self._store.rows(np.unique(keys[keys >= 0]).tolist())
            stored: dict[int, np.ndarray] = {}
            if with_vectors:
                found = sorted(rows)
                found_vectors = self._store.vectors_at(np.array(found, dtype=np.int64))
                stored = dict(zip(found, found_vectors, strict=True))
        results = []
        for row_scores, row_keys in zip(scores.tolist(), keys.tolist(), strict=True):
            hits = []
            for score, key in zip(row_scores, row_keys, strict=True):
                row = rows.get(key)  # plain ints: a numpy scalar key costs a hash each time
                if row is not None:
                    result = SearchResult(row.id, score, row.text, row.image, row.metadata)
                    hits.append((key, result))
            results.append(hits)
        return results, stored

    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        """Those of ``ids`` that are in the index."""
        with self._mutex:
            return self._store.existing_ids(list(ids))

    def ids(self) -> list[str]:
        """Every stored item's id, oldest first."""
        with self._mutex:
            return [row[1] for row in self._store.scan()]

    def stored_vectors(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        """The ``(dim,)`` vector stored for each of ``ids`` still in the index (for example,
        to compare search hits with each other)."""
        with self._mutex:
            return self._store.vectors_of(list(ids))

    def get(self, ids: Sequence[str]) -> dict[str, StoredItem]:
        """What is stored for each of ``ids`` that is in the index (absent ids are left out)."""
        if isinstance(ids, str):
            raise InputError("get takes a list of ids; wrap a single one in [...]")
        with self._mutex:
            return {id_: row for id_, (row, _) in self._store.lookup(ids).items()}

    def similar(
        self, ids: Sequence[str], *, k: int = 10, filter: Filter | None = None
    ) -> list[list[SearchResult]]:
        """ "More like this": the ``k`` items nearest to each stored item of ``ids`` (searched
        with its stored vector, so nothing is re-encoded), the item itself left out."""
        if isinstance(ids, str):
            raise InputError("similar takes a list of ids; wrap a single one in [...]")
        with self._mutex, self._store.snapshot():  # the vectors and the search agree
            found = self._store.lookup(ids)
            missing = [id_ for id_ in ids if id_ not in found]
            if missing:
                raise UnknownItemError(f"no item with id {missing[0]!r} in {self.folder}")
            if not ids:
                return []
            vectors = np.stack([found[id_][1] for id_ in ids])
            hits = self.search_vectors(vectors, k=k + 1, filter=filter)
        return [
            [hit for hit in row if hit.id != id_][:k] for id_, row in zip(ids, hits, strict=True)
        ]

    def info(self) -> dict[str, Any]:
        with self._mutex, self._store.snapshot():
            backend = self._current_backend()
        return {
            "path": str(self.folder),
            "items": len(self),
            "encoder": self.manifest.encoder,
            "dim": self.manifest.dim,
            "token_dim": self.manifest.token_dim,
            "backend": self.manifest.backend,
            "backend_in_use": backend.name,
            "memory": self.manifest.refiner,
            "format_version": self.manifest.format_version,
            "mmret_version": self.manifest.mmret_version,
        }


def discounted(
    bank: QueryBank,
    modality: str | None,
    hits: list[tuple[int, SearchResult]],
    stored: dict[int, np.ndarray],
) -> list[tuple[int, SearchResult]]:
    """``hits`` rescored with ``bank``'s discounts of their ``stored`` vectors (by store key)
    for a query of ``modality`` and re-sorted (unchanged for None: an image+text query, the
    bank holds single-modality queries)."""
    if not hits or modality is None:
        return hits
    discounts = bank.discount(np.stack([stored[key] for key, _ in hits]), modality)
    scores = np.array([hit.score for _, hit in hits]) - discounts
    order = np.argsort(-scores, kind="stable")
    return [(hits[i][0], replace(hits[i][1], score=float(scores[i]))) for i in order]


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


def encode_items(
    encoder: Encoder, items: Sequence[Item], report: SkipReport, pool: ThreadPoolExecutor
) -> tuple[list[Query], list[StoredItem], np.ndarray]:
    """Decode ``items``' images (in ``pool``) and encode them: what is encoded, what is stored
    and the ``(N, dim)`` vectors, for the N items whose image decoded (the others are skipped
    into ``report``). The one place items are encoded, in a process or on a Ray worker."""

    def decode(item: Item) -> Image.Image | ImageLoadError | None:
        if item.image is None:
            return None
        try:
            return encoder.load(item.image)
        except ImageLoadError as error:
            return error

    contents, stored = [], []
    for item, image in zip(items, pool.map(decode, items), strict=True):
        if isinstance(image, ImageLoadError):
            report.skip(f"{item.id}: {image}")
            continue
        contents.append(Query(text=item.text, image=image))
        stored.append(StoredItem(item.id, item.text, item.image_path, dict(item.metadata)))
    if not stored:
        return [], [], np.zeros((0, encoder.dim), dtype=np.float32)
    return contents, stored, encoder.encode(contents)


def _chunks(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk
