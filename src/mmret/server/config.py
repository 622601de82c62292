"""How a server is set up: one frozen dataclass, given to :func:`mmret.server.create_app`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from mmret.errors import InputError

#: Host names a loopback server answers to. Anything else is refused, so a web page on another
#: site cannot reach this server through a DNS name rebound to 127.0.0.1.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServerConfig:
    """Settings of one search server over the index folder ``index``.

    ``token`` guards adding and deleting (``None``: a random one is made at start-up and
    printed by ``mmret serve``); ``readonly`` opens the index read-only (no writes at all, and
    no writer lock held). Uploads are refused above ``max_image_bytes`` per image,
    ``max_request_bytes`` per request and ``max_pixels`` per decoded image (decompression
    bombs are caught from the header, before decoding). ``cors_origins`` lists the origins
    allowed to call the API from other sites' pages (none by default); ``allowed_hosts`` the
    ``Host`` headers answered (``("*",)`` for any). Concurrent queries are encoded together in
    batches of up to ``max_batch``; items being added are encoded ``write_slice`` at a time
    between query batches, and take ``write_share`` of the encoder's time while queries wait
    (see :mod:`mmret.server.batching`).
    """

    index: str
    token: str | None = None
    readonly: bool = False
    max_k: int = 100
    max_image_bytes: int = 16 * 2**20
    max_request_bytes: int = 64 * 2**20
    max_pixels: int = 40_000_000
    max_batch: int = 32
    write_slice: int = 1
    write_share: float = 0.2
    thumbnail_size: int = 256
    cors_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    wait: float = 10.0

    def __post_init__(self) -> None:
        positive = ("max_k", "max_image_bytes", "max_request_bytes", "max_pixels", "max_batch")
        for name in (*positive, "write_slice", "thumbnail_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InputError(f"server setting {name} must be a positive integer, got {value!r}")
        if not 0 < self.write_share < 1:
            raise InputError(f"write_share must be between 0 and 1, got {self.write_share!r}")
        if self.token is not None and len(self.token) < 8:
            raise InputError("the write token must have at least 8 characters")
        if not self.allowed_hosts:
            raise InputError("allowed_hosts is empty: no request could be answered")

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["cors_origins"] = list(self.cors_origins)
        values["allowed_hosts"] = list(self.allowed_hosts)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ServerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown server settings: {unknown}")
        data = dict(values)
        for name in ("cors_origins", "allowed_hosts"):
            if name in data:
                data[name] = tuple(data[name])
        return cls(**data)
