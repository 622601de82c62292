"""What the server does, without HTTP: search, fetch, add and remove over one open index.

The routes in :mod:`mmret.server.app` are thin wrappers over this object. Blocking work
(decoding, the index) runs in the caller's worker thread; encoding goes through the one
encoder thread of :class:`~mmret.server.batching.EncodeBatcher`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmret.engine import Retriever, SearchResult
from mmret.errors import InputError
from mmret.index.filters import Filter, conditions, parse_filter
from mmret.index.store import StoredItem
from mmret.items import Item, Query
from mmret.server.batching import EncodeBatcher
from mmret.server.config import ServerConfig
from mmret.server.images import Thumbnails, decode_image, keep_upload
from mmret.server.metrics import ServerMetrics


class DuplicateIdError(InputError):
    """An item to add has an id already in the index (HTTP 409)."""


class ReadOnlyError(InputError):
    """A write to a server that opened its index read-only (HTTP 403)."""


@dataclass(frozen=True)
class NewItem:
    """An item to add as the request gave it: its image as uploaded bytes."""

    id: str
    text: str | None
    metadata: Mapping[str, Any]
    image: bytes | None


class SearchService:
    """One index opened for a server (writable unless ``config.readonly``)."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.retriever = Retriever.open(config.index, readonly=config.readonly, wait=config.wait)
        self.metrics = ServerMetrics(lambda: float(len(self.retriever)))
        try:
            encoder = self.retriever.encoder  # the model loads now, at start-up
            # Both towers load now, and pay their first calls' one-off costs, before any query.
            encoder.encode([Query(text="warm-up", image=Image.new("RGB", (64, 64)))])
        except BaseException:
            self.retriever.close()
            raise
        self.batcher = EncodeBatcher(
            encoder,
            query_encoder=self.retriever.query_encoder,
            max_batch=config.max_batch,
            write_slice=config.write_slice,
            write_share=config.write_share,
            on_batch=self.metrics.encoder_batch,
        )
        self.thumbnails = Thumbnails(max_pixels=config.max_pixels)
        self._image_side = 2 * encoder.image_size

    def close(self) -> None:
        try:
            self.batcher.close()
        finally:
            self.retriever.close()

    # -- reading ----------------------------------------------------------------------------

    def check_search(self, k: int, filter_: Filter | Sequence[str] | None) -> Filter | None:
        """Validate ``k`` and the filter (either form), before any encoding is spent."""
        if k > self.config.max_k:
            raise InputError(f"k={k} is over this server's limit of {self.config.max_k}")
        if filter_ is None:
            return None
        parsed = parse_filter(filter_) if isinstance(filter_, list) else filter_
        if not isinstance(parsed, Mapping):
            raise InputError("filter must be a JSON object or a list of expressions")
        conditions(parsed)  # raises on a malformed filter
        return parsed or None

    def decode(self, what: str, data: bytes) -> Image.Image:
        return decode_image(
            what,
            data,
            limit=self.config.max_image_bytes,
            max_pixels=self.config.max_pixels,
            side=self._image_side,
        )

    def encode_query(self, query: Query) -> Future[np.ndarray]:
        return self.batcher.query(query)

    def search_vector(
        self, vector: np.ndarray, k: int, filter_: Filter | None, modality: str | None
    ) -> list[SearchResult]:
        """Hits of an encoded query; ``modality`` ("text", "image" or None for both) picks its
        query-bank normalisation, as :meth:`mmret.Retriever.search`."""
        return self.retriever.search_vectors(
            vector[None, :], k=k, filter=filter_, modality=modality
        )[0]

    def similar(self, item_id: str, k: int, filter_: Filter | None) -> list[SearchResult]:
        return self.retriever.similar([item_id], k=k, filter=filter_)[0]

    def get(self, item_id: str) -> StoredItem | None:
        return self.retriever.get([item_id]).get(item_id)

    def thumbnail(self, item_id: str, size: int) -> bytes | None:
        """A JPEG thumbnail of the item's image; ``None`` if it has none or it is unreadable."""
        item = self.get(item_id)
        if item is None or item.image is None:
            return None
        try:
            return self.thumbnails.get(item.image, min(size, 4 * self.config.thumbnail_size))
        except InputError:
            return None

    # -- writing ----------------------------------------------------------------------------

    def writable(self) -> None:
        if self.config.readonly:
            raise ReadOnlyError("this server opened its index read-only: it cannot add or delete")

    def prepare(self, items: Sequence[NewItem]) -> tuple[list[Item], list[Query]]:
        """Check items to add, keep their images, and return them with what to encode.

        Nothing is stored in the index here; images are checked before any is kept.
        """
        self.writable()
        if not items:
            raise InputError("no items to add")
        seen: set[str] = set()
        for new in items:
            if new.id in seen:
                raise InputError(f"item id {new.id!r} is given twice")
            seen.add(new.id)
        checked = [  # Item checks ids, texts and metadata, before any image is decoded
            Item(id=new.id, text=new.text, image=new.image, metadata=new.metadata) for new in items
        ]
        images = [
            None if new.image is None else self.decode(f"item {new.id!r}: image", new.image)
            for new in items
        ]
        taken = self.retriever.get([item.id for item in checked])
        if taken:
            raise DuplicateIdError(f"item id {sorted(taken)[0]!r} is already in the index")
        stored, contents = [], []
        for item, new, image in zip(checked, items, images, strict=True):
            path = None if new.image is None else keep_upload(Path(self.config.index), new.image)
            stored.append(Item(id=item.id, text=item.text, image=path, metadata=item.metadata))
            contents.append(Query(text=item.text, image=image))
        return stored, contents

    def encode_items(self, contents: Sequence[Query]) -> Future[np.ndarray]:
        return self.batcher.items(contents)

    def store(self, items: Sequence[Item], vectors: np.ndarray) -> None:
        """Add encoded items in one transaction: all of them or, on any error, none."""
        taken = self.retriever.get([item.id for item in items])  # added meanwhile by another
        if taken:
            raise DuplicateIdError(f"item id {sorted(taken)[0]!r} is already in the index")
        self.retriever.add_vectors(items, vectors)
        self.metrics.items_added.inc(len(items))

    def remove(self, item_id: str) -> int:
        self.writable()
        removed = self.retriever.remove([item_id])
        self.metrics.items_removed.inc(removed)
        return removed

    def health(self) -> dict[str, Any]:
        return self.retriever.info()
