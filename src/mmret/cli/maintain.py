"""``mmret check``, ``mmret repair`` and ``mmret recluster``: verify an index folder, restore
what can be restored, re-cluster a plaid index."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from mmret.cli.output import console, errors, friendly_errors, print_json, status
from mmret.maintenance.integrity import check_index, repair_index
from mmret.maintenance.recluster import recluster_index


@friendly_errors
def check(
    index_dir: Path = typer.Argument(..., metavar="DIR", help="Index folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Verify an index: manifest, database structure, item count and checksums, caches.

    Exits 0 when sound, 1 when damaged (`mmret repair DIR` restores what it can).
    """
    report = check_index(index_dir)
    if as_json:
        print_json(report.to_dict())
    else:
        for notice in report.notices:
            errors.print(f"[yellow]note:[/] {escape(notice)}", highlight=False)
        for problem in report.problems:
            errors.print(f"[bold red]damaged:[/] {escape(problem)}", highlight=False)
        if report.ok:
            console.print(f"[green]ok[/]: {escape(str(index_dir))} ({report.items} items)")
    if not report.ok:
        raise typer.Exit(1)


@friendly_errors
def repair(
    index_dir: Path = typer.Argument(..., metavar="DIR", help="Index folder."),
    wait: float = typer.Option(0.0, help="Seconds to wait for a running writer to finish."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Restore a damaged index: the manifest from its copy, readable rows of a damaged
    database (the damaged files are kept aside), caches rebuilt, leftovers removed."""
    report = repair_index(index_dir, wait=wait)
    after = check_index(index_dir)
    if as_json:
        print_json({**report.to_dict(), "ok": after.ok})
    else:
        for action in report.actions:
            console.print(f"- {escape(action)}", highlight=False)
        state = "[green]ok[/]" if after.ok else "[bold red]still damaged[/]"
        console.print(f"{state}: {escape(str(index_dir))} ({report.items} items)")
    if not after.ok:
        raise typer.Exit(1)


@friendly_errors
def recluster(
    index_dir: Path = typer.Argument(..., metavar="DIR", help="Index folder (plaid backend)."),
    wait: float = typer.Option(10.0, help="Seconds to wait for a running writer to finish."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Re-cluster a plaid index from its stored vectors: new token centroids and codec, built
    aside and swapped in. Readers keep searching meanwhile; writers wait."""
    with status("Re-clustering..."):
        report = recluster_index(index_dir, wait=wait)
    if as_json:
        print_json(report.to_dict())
    elif report.centroids == 0:
        console.print(
            f"[green]ok[/]: {index_dir}: {report.documents} documents, too few to cluster "
            "(below the backend's train_from): searched exactly"
        )
    else:
        console.print(
            f"[green]ok[/]: {index_dir}: {report.documents} documents, {report.centroids} "
            f"centroids ({report.seconds:.1f} s)"
        )
