"""``mmret train ensemble``: average single-vector models, with weights chosen on dev data."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer

from mmret.cache.embeddings import embed_pairs
from mmret.cli.output import console, friendly_errors, print_skips
from mmret.encoders import load_encoder
from mmret.errors import InputError
from mmret.ingest.pairs import read_pairs
from mmret.ingest.report import SkipReport
from mmret.training.ensemble import choose_weights


@friendly_errors
def train(
    member: list[str] = typer.Option(
        ..., "--member", "-m", help="A member model's spec (give two or more)."
    ),
    dev: Path = typer.Option(..., help="Dev manifest whose retrieval RSUM chooses the weights."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the ensemble."),
    step: float = typer.Option(0.05, min=0.001, max=0.5, help="Grid step of the weights."),
    cache_dir: Path | None = typer.Option(
        None, help="Embedding cache (default ~/.cache/mmret/embeddings)."
    ),
) -> None:
    """Combine single-vector models into one: the dot product of two of its vectors is the
    members' cosines averaged with weights.

    Every mixture of the members' weights on a STEP grid is scored on DEV image-text retrieval
    (both ways) and the best RSUM kept. Use it with --model ensemble:OUT; it encodes with every
    member, so it is as slow as the members together.
    """
    if len(member) < 2:
        raise InputError(f"an ensemble needs two or more --member models, got {member}")
    encoders = [load_encoder(spec) for spec in member]
    report = SkipReport()
    pairs = read_pairs(dev, report)
    dev_embedded = [
        embed_pairs(encoder, pairs, cache_dir=cache_dir, report=report, show_progress=True)
        for encoder in encoders
    ]
    print_skips(report)
    config = choose_weights(member, dev_embedded, step=step)
    record = {"dev": str(dev), **(config.record or {})}
    for spec, rsum in record["dev_rsum_alone"].items():
        console.print(f"{spec} alone: dev RSUM {rsum:.1f}", highlight=False)
    for weights, rsum in record["dev_rsum"].items():
        console.print(f"weights {weights}: dev RSUM {rsum:.1f}", highlight=False)
    replace(config, record=record).save(out)
    chosen = ", ".join(f"{spec} {w:g}" for spec, w in zip(member, config.weights, strict=True))
    console.print(f"[green]saved the ensemble to {out}[/]: {chosen}", highlight=False)
