"""Progress bars for long loops; silent unless the caller asks (the CLI does)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")


def progress(
    items: Iterable[T], *, total: int | None, description: str, enabled: bool
) -> Iterator[T]:
    """Yield ``items``; when ``enabled``, draw a bar on stderr advancing one step per item."""
    if not enabled:
        yield from items
        return
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    )
    with bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)


@contextmanager
def quiet_weight_loading() -> Iterator[None]:
    """Hide the bar transformers draws while it loads a model's weights (``Loading weights:
    100%|...| 103/103``), which would otherwise interrupt mmret's own output.

    Only around the load, and through transformers' own switch, which is put back as it was
    afterwards; Hugging Face Hub's download bars stay as they were (a download is worth one).
    """
    from huggingface_hub.utils.tqdm import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )
    from transformers.utils import logging as library

    library_bars = library.is_progress_bar_enabled()
    hub_bars = not are_progress_bars_disabled()
    library.disable_progress_bar()  # which turns the hub's bars off too
    if hub_bars:
        enable_progress_bars()
    try:
        yield
    finally:
        if library_bars:
            library.enable_progress_bar()  # which turns the hub's bars on too
        if not hub_bars and not are_progress_bars_disabled():
            disable_progress_bars()
