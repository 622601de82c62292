"""What mmret indexes and what it is asked: items with an optional text and an optional image."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from mmret.errors import InputError

#: An image as a caller may hand it over: a path, the encoded file's bytes, or a decoded image.
ImageInput = str | Path | bytes | Image.Image


@dataclass(frozen=True)
class Query:
    """A search query: a text, an image, or both (an image+text query)."""

    text: str | None = None
    image: ImageInput | None = None

    def __post_init__(self) -> None:
        if self.text is None and self.image is None:
            raise InputError("a query needs a text, an image, or both; got neither")
        if self.text is not None and not isinstance(self.text, str):
            raise InputError(f"query text must be a string, got {type(self.text).__name__}")


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
        if self.text is None and self.image is None:
            raise InputError(f"item {self.id!r} has neither a text nor an image")

    @property
    def image_path(self) -> str | None:
        """The image's path as stored in the index (``None`` for bytes or no image)."""
        return str(self.image) if isinstance(self.image, str | Path) else None

    def as_query(self) -> Query:
        return Query(text=self.text, image=self.image)
