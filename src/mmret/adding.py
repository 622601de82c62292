"""Adding items to an index folder: decode, encode and store them, a chunk a transaction.

Ids already stored are skipped and reported, images that do not decode too; where the index
stores token features for reranking, they are made from the same decoded inputs. The
:class:`~mmret.Retriever`'s ``add`` calls are this module's; the scale-out shards encode with
:func:`encode_items` too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from mmret._progress import progress
from mmret.encoders import Encoder, load_encoder
from mmret.errors import ImageLoadError, InputError
from mmret.index.folder import IndexFolder
from mmret.index.store import StoredItem
from mmret.ingest.report import SkipReport
from mmret.ingest.sources import ItemSource
from mmret.items import Item, Query
from mmret.reranker import token_features

if TYPE_CHECKING:
    from mmret.heads.cross_encoder import SideTokens

#: Items encoded and stored in one transaction.
ADD_CHUNK = 256


@dataclass
class AddReport:
    """What an :meth:`Retriever.add` call did: items added and what was skipped, with reasons."""

    added: int = 0
    skipped: SkipReport = field(default_factory=SkipReport)


class ItemWriter:
    """Encodes items with ``encoder`` (refined by a memory if ``refined``) into ``index``."""

    def __init__(
        self, index: IndexFolder, encoder: Callable[[], Encoder], *, refined: bool
    ) -> None:
        self.index = index
        self._encoder = encoder  # loaded on first use
        self.refined = refined
        self._token_backend: Encoder | None = None

    def add(
        self,
        items: Iterable[Item],
        report: SkipReport | None = None,
        show_progress: bool = False,
        total: int | None = None,
    ) -> AddReport:
        """See :meth:`mmret.Retriever.add`."""
        self.index.writable()
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
        existing = self.index.existing_ids([item.id for item in chunk])
        fresh = []
        for item in chunk:
            if item.id in existing:
                report.skip(f"{item.id}: already in the index")
            else:
                fresh.append(item)
                existing.add(item.id)
        contents, stored, vectors = encode_items(self._encoder(), fresh, report, pool)
        if not stored:
            return 0
        return self._store(stored, vectors, report, self.token_features(contents))

    def add_encoded(
        self, items: Sequence[Item], vectors: np.ndarray, report: SkipReport
    ) -> AddReport:
        """Store items with their ``(N, dim)`` unit vectors made elsewhere, as they are."""
        self.index.writable()
        if self.index.token_spec is not None or self.refined:
            raise InputError(
                f"{self.index.folder} refines its embeddings with a memory or stores token "
                "features for reranking, which are computed while adding; add its items with add()"
            )
        stored = [StoredItem(i.id, i.text, i.image_path, dict(i.metadata)) for i in items]
        added = self._store(stored, np.asarray(vectors, dtype=np.float32), report, None)
        return AddReport(added, report)

    def add_vectors(self, items: Sequence[Item], vectors: np.ndarray) -> None:
        """See :meth:`mmret.Retriever.add_vectors`."""
        self.index.writable()
        self.index.add_new(items, vectors, self.token_features(items))

    def _store(
        self,
        stored: list[StoredItem],
        vectors: np.ndarray,
        report: SkipReport,
        tokens: SideTokens | None,
    ) -> int:
        with self.index.mutex:  # another thread may have added some of these ids meanwhile
            taken = self.index.existing_ids([item.id for item in stored])
            keep = [item.id not in taken for item in stored]
            for row, kept in zip(stored, keep, strict=True):
                if not kept:
                    report.skip(f"{row.id}: already in the index")
            stored = [item for item, kept in zip(stored, keep, strict=True) if kept]
            if stored:
                kept_tokens = None if tokens is None else tokens.take(torch.tensor(keep))
                self.index.insert(stored, vectors[np.asarray(keep)], kept_tokens)
        return len(stored)

    def token_features(self, contents: Sequence[Query | Item]) -> SideTokens | None:
        """Token features of items about to be stored (None: the index stores none)."""
        spec = self.index.token_spec
        if spec is None:
            return None
        if self._token_backend is None:
            encoder = self._encoder()
            own = encoder if encoder.layer_source == spec.source else None
            self._token_backend = own or load_encoder(spec.backbone)
        return token_features(self._token_backend, spec, contents)


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
