"""The FastAPI app: :func:`create_app` builds it; the index and model open at start-up.

Routes are thin wrappers over :class:`~mmret.server.service.SearchService`. Everything that
blocks runs in worker threads, never on the event loop; encoding runs on the service's one
encoder thread, which batches concurrent queries.
"""

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from mmret._version import __version__
from mmret.errors import (
    IndexBusyError,
    IndexFormatError,
    InputError,
    MmretError,
    UnknownItemError,
)
from mmret.items import Query as SearchQuery
from mmret.search_steps import query_modality
from mmret.server.config import ServerConfig
from mmret.server.guard import RequestGuard
from mmret.server.images import UploadTooLargeError, decode_base64
from mmret.server.schemas import (
    ERRORS,
    WRITE_ERRORS,
    AddResponse,
    ErrorResponse,
    HealthResponse,
    Hit,
    ItemResponse,
    RemoveResponse,
    SearchRequest,
    SearchResponse,
)
from mmret.server.service import DuplicateIdError, NewItem, ReadOnlyError, SearchService

_STATUS: list[tuple[type[Exception], int]] = [  # most specific first
    (UploadTooLargeError, 413),
    (UnknownItemError, 404),
    (DuplicateIdError, 409),
    (ReadOnlyError, 403),
    (InputError, 400),
    (IndexBusyError, 503),
    (IndexFormatError, 500),
    (MmretError, 500),
]


def create_app(config: ServerConfig) -> FastAPI:
    """A search server over the index folder ``config.index``.

    Nothing is loaded here: the index and its model open when the app starts (its lifespan),
    and close when it stops. The write token is ``app.state.token`` (made here when
    ``config.token`` is ``None``).
    """
    token = None if config.readonly else config.token or secrets.token_urlsafe(24)
    holder: dict[str, SearchService] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        holder["service"] = await run_in_threadpool(SearchService, config)
        try:
            yield
        finally:
            await run_in_threadpool(holder.pop("service").close)

    # The interactive docs load scripts from a CDN, which a server that must work offline
    # cannot count on: the schema is served, the pages are not.
    app = FastAPI(
        title="mmret",
        version=__version__,
        summary="Search images, texts and image+text items.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.token = token
    app.state.config = config

    def service() -> SearchService:
        if "service" not in holder:
            raise HTTPException(503, "the server is starting or stopping")
        return holder["service"]

    _add_error_handlers(app)
    _add_routes(app, config, service, token)
    _add_middleware(app, config, lambda: holder.get("service"))
    static = resources.files("mmret.server") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    return app


def _add_routes(
    app: FastAPI, config: ServerConfig, service: Callable[[], SearchService], token: str | None
) -> None:
    bearer = HTTPBearer(auto_error=False, description="The token `mmret serve` printed.")

    def writer(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> SearchService:
        current = service()
        current.writable()
        given = credentials.credentials if credentials is not None else ""
        if token is None or not secrets.compare_digest(given.encode(), token.encode()):
            raise HTTPException(
                401,
                "adding and deleting need the server's token: Authorization: Bearer TOKEN",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return current

    async def run_search(
        query: SearchQuery | None, like: str | None, k: int, filter_: Any
    ) -> SearchResponse:
        loop = asyncio.get_running_loop()
        started = loop.time()
        current = service()
        checked = current.check_search(k, filter_)
        if like is not None:
            if query is not None:
                raise InputError("give either like (an item id) or a text/image query, not both")
            hits = await run_in_threadpool(current.similar, like, k, checked)
        elif query is None:
            raise InputError("a search needs a text, an image, both, or like (an item id)")
        else:
            vector = await asyncio.wrap_future(current.encode_query(query))
            modality = query_modality(query)
            hits = await run_in_threadpool(current.search_vector, vector, k, checked, modality)
        took = 1000 * (loop.time() - started)
        return SearchResponse(results=[Hit.of(hit) for hit in hits], took_ms=round(took, 2))

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(str(resources.files("mmret.server") / "static" / "index.html"))

    @app.post("/search", response_model=SearchResponse, responses=ERRORS, tags=["search"])
    async def search(request: SearchRequest) -> SearchResponse:
        """Search with a text, a base64 image, both, or `like` (more like a stored item)."""
        query, text = None, _query_text(request.text)
        if request.image is not None or text is not None:
            image = None
            if request.image is not None:
                data = decode_base64("image", request.image, config.max_image_bytes)
                image = await run_in_threadpool(service().decode, "image", data)
            query = SearchQuery(text=text, image=image)
        return await run_search(query, request.like, request.k, request.filter)

    @app.post("/search/upload", response_model=SearchResponse, responses=ERRORS, tags=["search"])
    async def search_upload(
        text: Annotated[str | None, Form()] = None,
        image: Annotated[UploadFile | None, File(description="Image query.")] = None,
        like: Annotated[str | None, Form()] = None,
        k: Annotated[int, Form(ge=1)] = 10,
        filter: Annotated[
            str | None, Form(description="A JSON object or list, as in /search.")
        ] = None,
    ) -> SearchResponse:
        """The same search with the image as a multipart upload (what a browser form sends)."""
        query, text = None, _query_text(text)
        if image is not None or text is not None:
            decoded = None
            if image is not None:
                data = await _read_upload(image, "image", config.max_image_bytes)
                decoded = await run_in_threadpool(service().decode, "image", data)
            query = SearchQuery(text=text, image=decoded)
        return await run_search(query, like or None, k, _json_field("filter", filter))

    @app.get(
        "/items/{item_id:path}",
        response_model=ItemResponse,
        responses={404: {"model": ErrorResponse}},
        tags=["items"],
    )
    async def get_item(item_id: str) -> ItemResponse:
        """One stored item: its text, metadata and thumbnail URL."""
        item = await run_in_threadpool(service().get, item_id)
        if item is None:
            raise UnknownItemError(f"no item with id {item_id!r}")
        return ItemResponse.of(item)

    @app.get(
        "/thumbnails/{item_id:path}",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}, 404: {"model": ErrorResponse}},
        tags=["items"],
    )
    async def thumbnail(
        item_id: str,
        size: Annotated[int, Query(ge=16, le=1024)] = config.thumbnail_size,
    ) -> Response:
        """A JPEG thumbnail of an item's image, fitted in `size` x `size` pixels."""
        data = await run_in_threadpool(service().thumbnail, item_id, size)
        if data is None:
            raise UnknownItemError(f"no readable image for item {item_id!r}")
        return Response(
            data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=300"}
        )

    @app.post(
        "/items",
        status_code=201,
        response_model=AddResponse,
        responses=WRITE_ERRORS,
        tags=["items"],
    )
    async def add_items(
        current: Annotated[SearchService, Depends(writer)],
        id: Annotated[str | None, Form(description="One item: its id.")] = None,
        text: Annotated[str | None, Form(description="One item: its text.")] = None,
        metadata: Annotated[
            str | None, Form(description="One item: its metadata, a JSON object.")
        ] = None,
        image: Annotated[UploadFile | None, File(description="One item: its image.")] = None,
        items: Annotated[
            str | None,
            Form(
                description='Several items: a JSON list of {"id", "text", "metadata", "image"}, '
                "where image is the position of the item's file in files."
            ),
        ] = None,
        files: Annotated[
            list[UploadFile] | None, File(description="Several items' images.")
        ] = None,
    ) -> AddResponse:
        """Add items, in one transaction: all of them, or none (with the reason)."""
        limit = config.max_image_bytes
        if items is not None:
            if id is not None or image is not None:
                raise InputError("give either items (several) or id (one item), not both")
            uploads = [
                await _read_upload(f, f"files[{i}]", limit) for i, f in enumerate(files or [])
            ]
            new = _item_list(_json_field("items", items), uploads)
        else:
            if id is None:
                raise InputError("an item to add needs an id (or give items for several)")
            data = None if image is None else await _read_upload(image, "image", limit)
            meta = _json_field("metadata", metadata) or {}
            new = [NewItem(id=id, text=text, metadata=_mapping("metadata", meta), image=data)]
        stored, contents = await run_in_threadpool(current.prepare, new)
        vectors = await asyncio.wrap_future(current.encode_items(contents))
        await run_in_threadpool(current.store, stored, vectors)
        return AddResponse(added=len(stored), ids=[item.id for item in stored])

    @app.delete(
        "/items/{item_id:path}",
        response_model=RemoveResponse,
        responses={**WRITE_ERRORS, 404: {"model": ErrorResponse}},
        tags=["items"],
    )
    async def remove_item(
        item_id: str, current: Annotated[SearchService, Depends(writer)]
    ) -> RemoveResponse:
        """Remove one item by id."""
        removed = await run_in_threadpool(current.remove, item_id)
        if not removed:
            raise UnknownItemError(f"no item with id {item_id!r}")
        return RemoveResponse(removed=removed)

    @app.get("/health", response_model=HealthResponse, tags=["service"])
    async def health() -> HealthResponse:
        """Whether the server is up, and what it serves."""
        info = await run_in_threadpool(service().health)
        return HealthResponse(
            status="ok",
            items=info["items"],
            encoder=info["encoder"],
            backend=info["backend_in_use"],
            readonly=config.readonly,
            max_k=config.max_k,
            version=__version__,
        )

    @app.get("/metrics", response_class=Response, tags=["service"])
    async def metrics() -> Response:
        """Prometheus metrics: requests, latency, encoder batches, item count."""
        data = await run_in_threadpool(service().metrics.render)
        return Response(data, media_type="text/plain; version=0.0.4; charset=utf-8")


def _query_text(text: str | None) -> str | None:
    """A query's text, ``None`` when blank (a blank box is no text query)."""
    return text if text is not None and text.strip() else None


async def _read_upload(upload: UploadFile, what: str, limit: int) -> bytes:
    if upload.size is not None and upload.size > limit:
        raise UploadTooLargeError(f"{what}: {upload.size:,} bytes is over the limit of {limit:,}")
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise UploadTooLargeError(f"{what}: over the limit of {limit:,} bytes per image")
    return data


def _json_field(name: str, text: str | None) -> Any:
    if text is None or not text.strip():
        return None
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as error:
        raise InputError(f"{name}: not valid JSON ({error})") from None


def _mapping(what: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InputError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _item_list(value: Any, uploads: list[bytes]) -> list[NewItem]:
    if not isinstance(value, list):
        raise InputError("items must be a JSON list of objects")
    new = []
    for position, entry in enumerate(value):
        what = f"items[{position}]"
        entry = _mapping(what, entry)
        unknown = sorted(set(entry) - {"id", "text", "metadata", "image"})
        if unknown:
            raise InputError(f"{what}: unknown keys {unknown}")
        image = entry.get("image")
        if image is not None and (
            not isinstance(image, int) or isinstance(image, bool) or not 0 <= image < len(uploads)
        ):
            raise InputError(f"{what}: image must be a position in files (0..{len(uploads) - 1})")
        item_id = entry.get("id")
        if not isinstance(item_id, str):
            raise InputError(f"{what}: id must be a string, got {item_id!r}")
        text = entry.get("text")
        metadata = _mapping(f"{what}: metadata", entry.get("metadata") or {})
        data = None if image is None else uploads[image]
        new.append(NewItem(id=item_id, text=text, metadata=metadata, image=data))
    return new


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=dict(headers or {}))


def _add_error_handlers(app: FastAPI) -> None:
    async def mmret_error(request: Request, error: Exception) -> JSONResponse:
        status = next(code for kind, code in _STATUS if isinstance(error, kind))
        return _error(status, str(error))

    async def http_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, HTTPException)
        return _error(error.status_code, str(error.detail), error.headers)

    async def invalid_request(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        parts = []
        for problem in error.errors():
            where = ".".join(str(p) for p in problem.get("loc", ()) if p != "body")
            parts.append(f"{where or 'request'}: {problem.get('msg', 'invalid')}")
        return _error(422, "; ".join(parts) or "invalid request")

    app.add_exception_handler(MmretError, mmret_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid_request)


def _add_middleware(
    app: FastAPI, config: ServerConfig, service: Callable[[], SearchService | None]
) -> None:
    # Added innermost first: CORS answers preflight requests inside the guard.
    if config.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(
        RequestGuard,
        max_body=config.max_request_bytes,
        allowed_hosts=config.allowed_hosts,
        service=service,
    )
