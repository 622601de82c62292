"""What mmret indexes and what it is asked: items with an optional text and an optional image."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from mmret.errors import InputError

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
    """Refuse metadata the store cannot keep as JSON (sets, bytes, NaN, ...)."""
    try:
        json.dumps(dict(metadata), allow_nan=False)
    except (TypeError, ValueError) as error:
        raise InputError(f"{what} is not JSON-serialisable ({error})") from None


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
