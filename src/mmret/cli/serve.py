"""``mmret serve``: the search server and web page over one index."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import typer
from rich.markup import escape

from mmret.cli.output import console, errors, friendly_errors
from mmret.engine import Retriever
from mmret.errors import InputError
from mmret.index.manifest import MANIFEST_FILE


@friendly_errors
def serve(
    index_dir: Path = typer.Argument(..., metavar="DIR", help="Index folder to serve."),
    host: str = typer.Option(
        "127.0.0.1", help="Address to listen on; anything but loopback opens it to the network."
    ),
    port: int = typer.Option(8000, min=0, max=65535, help="Port to listen on."),
    token: str | None = typer.Option(
        None,
        envvar="MMRET_TOKEN",
        help="Token that adding and deleting need (default: a random one, printed).",
    ),
    readonly: bool = typer.Option(
        False, "--readonly", help="Open the index read-only: no adding or deleting."
    ),
    cors: list[str] = typer.Option(
        [], "--cors", help="An origin whose pages may call the API (repeatable; none by default)."
    ),
    allowed_host: list[str] = typer.Option(
        [],
        "--allowed-host",
        help="A Host name to answer besides loopback's (repeatable; '*' for any).",
    ),
    max_k: int = typer.Option(100, min=1, help="Most results one search may ask for."),
    max_image_mb: float = typer.Option(16.0, min=0.01, help="Largest image upload, in MB."),
    max_pixels: int = typer.Option(
        40_000_000, min=1, help="Largest image, in pixels (larger ones are refused unread)."
    ),
    max_batch: int = typer.Option(32, min=1, help="Most queries encoded together."),
    wait: float = typer.Option(10.0, help="Seconds to wait if another writer has DIR open."),
) -> None:
    """Serve an index over HTTP: a search page at /, a JSON API, Prometheus /metrics.

    The API is described at /openapi.json. Adding and deleting need the token, sent as
    'Authorization: Bearer TOKEN'.
    """
    try:
        import uvicorn

        from mmret.server import ServerConfig, create_app
        from mmret.server.config import LOOPBACK_HOSTS
    except ImportError as error:
        raise InputError(
            f"mmret serve needs the serve extra ({error.name} is missing): "
            "pip install 'mmret[serve]'"
        ) from None
    if not (index_dir / MANIFEST_FILE).is_file():
        raise InputError(f"{index_dir}: not an mmret index (no {MANIFEST_FILE})")
    # A damaged index or another writer is said here in one line, rather than as a traceback
    # from the server's start-up (the model is not loaded for this).
    Retriever.open(index_dir, readonly=readonly, wait=wait).close()
    hosts = (*LOOPBACK_HOSTS, *allowed_host)
    if not _loopback(host) and not allowed_host:
        hosts = ("*",)  # told to listen on the network: answer to whatever name it is reached by
    config = ServerConfig(
        index=str(index_dir),
        token=token,
        readonly=readonly,
        max_k=max_k,
        max_image_bytes=int(max_image_mb * 2**20),
        max_pixels=max_pixels,
        max_batch=max_batch,
        cors_origins=tuple(cors),
        allowed_hosts=hosts,
        wait=wait,
    )
    app = create_app(config)
    shown = f"[{host}]" if ":" in host else host
    # soft_wrap: a URL or a token broken over two lines cannot be copied
    console.print(
        f"serving {escape(str(index_dir))} at [bold]http://{shown}:{port}/[/]", soft_wrap=True
    )
    if not _loopback(host):
        errors.print(f"[yellow]listening on {escape(host)}: reachable from the network[/]")
    if app.state.token is not None and token is None:
        console.print(f"write token (adding, deleting): [bold]{app.state.token}[/]", soft_wrap=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
