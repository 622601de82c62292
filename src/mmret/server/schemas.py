"""What the HTTP API takes and returns (pydantic lives here, at the edge, and nowhere else)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field

from mmret.engine import SearchResult
from mmret.index.store import StoredItem

_FILTER_HELP = (
    'Metadata filter: a JSON object as in the Python API ({"kind": "photo"}, '
    '{"kind": ["a", "b"]}, {"year": {"gte": 2000}}), or a list of CLI expressions '
    '(["kind=photo", "year>=2000"]).'
)


class SearchRequest(BaseModel):
    """A text, an image (base64), or both; or ``like``: the id of an item to find more like."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, description="Text query.")
    image: str | None = Field(
        None, description="Image query: the file's bytes in base64 (a data: URL is fine)."
    )
    like: str | None = Field(
        None, description="More like this: the id of a stored item (no text or image then)."
    )
    k: int = Field(10, ge=1, description="Number of results (at most the server's max_k).")
    filter: dict[str, Any] | list[str] | None = Field(None, description=_FILTER_HELP)


class Hit(BaseModel):
    id: str
    score: float
    text: str | None
    metadata: dict[str, Any]
    thumbnail: str | None = Field(description="URL of the item's thumbnail (null: no image).")

    @classmethod
    def of(cls, result: SearchResult) -> Hit:
        return cls(
            id=result.id,
            score=result.score,
            text=result.text,
            metadata=result.metadata,
            thumbnail=thumbnail_url(result.id) if result.image else None,
        )


class SearchResponse(BaseModel):
    results: list[Hit]
    took_ms: float = Field(description="Time the server spent on the search.")


class ItemResponse(BaseModel):
    id: str
    text: str | None
    metadata: dict[str, Any]
    thumbnail: str | None

    @classmethod
    def of(cls, item: StoredItem) -> ItemResponse:
        thumbnail = thumbnail_url(item.id) if item.image else None
        return cls(id=item.id, text=item.text, metadata=item.metadata, thumbnail=thumbnail)


class AddResponse(BaseModel):
    added: int
    ids: list[str]


class RemoveResponse(BaseModel):
    removed: int


class HealthResponse(BaseModel):
    status: str
    items: int
    encoder: str
    backend: str
    readonly: bool
    max_k: int
    version: str


class ErrorResponse(BaseModel):
    error: str = Field(description="What is wrong, naming the input.")


def thumbnail_url(item_id: str) -> str:
    # Everything escaped, "/" included: a browser would fold "a/../b" in a path.
    return f"/thumbnails/{quote(item_id, safe='')}"


#: Error responses documented in the OpenAPI schema for every route that can give them.
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Malformed input"},
    413: {"model": ErrorResponse, "description": "Upload over the size limit"},
}
WRITE_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    401: {"model": ErrorResponse, "description": "Missing or wrong token"},
    403: {"model": ErrorResponse, "description": "The server is read-only"},
    409: {"model": ErrorResponse, "description": "An id already in the index"},
}
