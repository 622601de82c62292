"""What mmret indexes and what it is asked: items with an optional text and an optional image."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from mmret.errors import InputError

#: How deeply metadata may nest (the metadata mapping itself is the first level).
MAX_METADATA_DEPTH = 32

#: An image as a caller may hand it over: a path, the encoded file's bytes, or a decoded image.
ImageInput = str | Path | bytes | Image.Image


def check_text(what: str, text: object) -> None:
    """Refuse non-strings and strings that cannot be stored as UTF-8 (lone surrogates)."""
    if not isinstance(text, str):
        raise InputError(f"{what} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InputError(
            f"{what} is not valid Unicode (unpaired surrogate at position {error.start})"
        ) from None


def check_metadata(what: str, metadata: Mapping[str, Any]) -> None:
    """Refuse metadata the store cannot keep as JSON and give back intact: sets, bytes, NaN,
    integers of more than 4,300 digits, lone surrogates, nesting deeper than
    :data:`MAX_METADATA_DEPTH` levels (SQLite's and Python's JSON readers stop at some depth)."""
    if _depth(metadata) > MAX_METADATA_DEPTH:
        raise InputError(f"{what} is nested more than {MAX_METADATA_DEPTH} levels deep")
    try:
        text = json.dumps(dict(metadata), allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError) as error:
        raise InputError(f"{what} is not JSON-serialisable ({error})") from None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(
            f"{what} holds text that is not valid Unicode (unpaired surrogate)"
        ) from None


def _depth(value: object) -> int:
    """How deeply dicts and lists nest in ``value`` (0 for a scalar), counted without
    recursion and only up to one level past the limit; each container is looked at once, so
    a structure that contains itself ends the count (JSON then refuses it)."""
    depth, level, seen = 0, [value], set[int]()
    while depth <= MAX_METADATA_DEPTH:
        containers = [
            v for v in level if isinstance(v, Mapping | list | tuple) and id(v) not in seen
        ]
        if not containers:
            break
        seen.update(id(container) for container in containers)
        depth += 1
        level = [
            child
            for container in containers
            for child in (container.values() if isinstance(container, Mapping) else container)
        ]
    return depth


@dataclass(frozen=True)
class Query:
    """A search query: a text, an image, or both (an image+text query)."""

    text: str | None = None
    image: ImageInput | None = None

    def __post_init__(self) -> None:
        if self.text is None and self.image is None:
            raise InputError("a query needs a text, an image, or both; got neither")
        if self.text is not None:
            check_text("query text", self.text)


@dataclass(frozen=True)
class Item:
    """One thing to index: an id plus an optional text, an optional image and metadata.

    ``image`` is a path (what gets stored and returned) or raw bytes; ``metadata`` must be
    JSON-serialisable and is what search-time filters look at.
    """

    id: str
    text: str | None = None
    image: str | Path | bytes | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise InputError(f"item id must be a non-empty string, got {self.id!r}")
        check_text("item id", self.id)
        if self.text is None and self.image is None:
            raise InputError(f"item {self.id!r} has neither a text nor an image")
        if self.text is not None:
            check_text(f"item {self.id!r}: text", self.text)
        if isinstance(self.image, str | Path):
            check_text(f"item {self.id!r}: image path", str(self.image))
        check_metadata(f"item {self.id!r}: metadata", self.metadata)

    @property
    def image_path(self) -> str | None:
        """The image's path as stored in the index (``None`` for bytes or no image)."""
        return str(self.image) if isinstance(self.image, str | Path) else None

    def as_query(self) -> Query:
        return Query(text=self.text, image=self.image)


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
