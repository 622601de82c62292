"""Shared CLI plumbing: turning mmret errors into one red line, tables, and JSON output."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from mmret.engine import SearchResult
from mmret.errors import MmretError
from mmret.ingest.report import SkipReport

P = ParamSpec("P")
R = TypeVar("R")

console = Console()
errors = Console(stderr=True, soft_wrap=True)


def friendly_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Report an :class:`MmretError` as ``error: ...`` and exit 1, without a traceback."""

    @wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except MmretError as error:
            errors.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False)
            raise typer.Exit(1) from None

    return wrapper


class ReflowedHelp(TyperGroup):
    """A command group whose help texts, and those of every command under it, are reflowed.

    Typer keeps a docstring's line breaks, so a sentence broke wherever its source line ended
    ("each caption ranks all / images"); with each paragraph joined into one line, rich wraps
    it at the terminal's width. A paragraph starting with ``\\b`` keeps its breaks (click's
    convention for preformatted text).
    """

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        _reflow_all(self)


class _Documented(Protocol):
    help: str | None


def _reflow_all(command: _Documented) -> None:
    command.help = reflow(command.help)
    for sub in getattr(command, "commands", {}).values():
        _reflow_all(sub)


def reflow(text: str | None) -> str | None:
    """``text`` with the line breaks inside each paragraph (blank-line separated) removed."""
    if text is None:
        return None
    paragraphs = text.split("\n\n")
    return "\n\n".join(
        p if p.startswith("\b") else " ".join(line.strip() for line in p.splitlines())
        for p in paragraphs
    )


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def print_skips(report: SkipReport) -> None:
    if report.skipped:
        # Reasons quote the input: "[/x]" in a file name is text here, not rich markup.
        errors.print(f"[yellow]{escape(report.summary())}[/]", highlight=False)


def results_table(title: str, hits: list[SearchResult]) -> Table:
    table = Table(title=escape(title), title_justify="left", show_lines=False)
    table.add_column("#", justify="right", style="dim")
    table.add_column("score", justify="right")
    table.add_column("id", style="bold")
    table.add_column("text / image")
    for rank, hit in enumerate(hits, start=1):
        shown = hit.text.replace("\n", " / ") if hit.text else ""
        if len(shown) > 80:
            shown = shown[:77] + "..."
        table.add_row(
            str(rank), f"{hit.score:.3f}", escape(hit.id), escape(shown or hit.image or "")
        )
    return table


@contextmanager
def status(message: str) -> Iterator[None]:
    with errors.status(message):
        yield


def print_saved(what: str, out: Path, usage: str) -> None:
    """``saved WHAT to OUT (use it with USAGE)``: the last line of every training command."""
    console.print(
        f"[green]saved {what} to {escape(str(out))}[/] (use it with {escape(usage)})",
        highlight=False,
    )
