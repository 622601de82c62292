"""An ASGI middleware in front of every route: Host check, request size limit, metrics,
security headers.

Written as plain ASGI rather than with ``BaseHTTPMiddleware``, which costs a task and a
memory stream per request; it sits on the path of every query.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from mmret.server.service import SearchService

#: The page uses only its own files: no inline script, no other origin, no framing.
_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' blob: data:; script-src 'self'; "
        b"style-src 'self'; connect-src 'self'; frame-ancestors 'none'",
    ),
]


class RequestGuard:
    """Refuses a ``Host`` not in ``allowed_hosts`` (``"*"``: any) with 400, bodies over
    ``max_body`` bytes with 413 (by their Content-Length, or while they stream in), records
    each request in the service's metrics, adds security headers."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body: int,
        allowed_hosts: tuple[str, ...],
        service: Callable[[], SearchService | None],
    ) -> None:
        self.app = app
        self.max_body = max_body
        self.allowed_hosts = None if "*" in allowed_hosts else {h.lower() for h in allowed_hosts}
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state: dict[str, Any] = {"status": 500, "too_large": False, "replaced": False}
        headers = dict(scope["headers"])
        host = _host_name(headers.get(b"host", b"").decode("latin-1"))
        if self.allowed_hosts is not None and host not in self.allowed_hosts:
            message = f"host {host!r} is not served here (see mmret serve --allowed-host)"
            await self._answer(send, state, 400, message)
            self._record(scope, state, started)
            return
        declared = headers.get(b"content-length", b"0")
        try:
            too_large = int(declared) > self.max_body
        except ValueError:
            too_large = False  # h11 refuses malformed lengths before this runs
        if too_large:
            await self._refuse(send, state)
            self._record(scope, state, started)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    state["too_large"] = True
                    return {"type": "http.disconnect"}  # the app stops reading the body
            return message

        async def guarded_send(message: Message) -> None:
            if state["replaced"]:
                return  # the app's own answer to a cut-off body is dropped
            if message["type"] == "http.response.start":
                if state["too_large"]:
                    await self._refuse(send, state)
                    return
                state["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *_HEADERS]}
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not state["too_large"]:
                raise
            if not state["replaced"]:  # the app gave up on the cut-off body with an error
                await self._refuse(send, state)
        finally:
            self._record(scope, state, started)

    async def _refuse(self, send: Send, state: dict[str, Any]) -> None:
        message = f"request body over the limit of {self.max_body:,} bytes"
        await self._answer(send, state, 413, message)

    async def _answer(self, send: Send, state: dict[str, Any], status: int, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        state["status"], state["replaced"] = status, True
        headers = [(b"content-type", b"application/json"), *_HEADERS]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _record(self, scope: Scope, state: dict[str, Any], started: float) -> None:
        service = self.service()
        if service is None:
            return
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        service.metrics.request(
            template, scope["method"], state["status"], time.perf_counter() - started
        )


def _host_name(header: str) -> str:
    """The host of a ``Host`` header, without its port (``[::1]:8000`` -> ``::1``)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rpartition(":")[0] if header.count(":") == 1 else header
