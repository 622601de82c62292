"""``mmret train query-bank`` and the ``--query-bank`` option of search and evaluation."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer

from mmret.cache.embeddings import embed_pairs
from mmret.cli.output import console, friendly_errors, print_skips
from mmret.encoders import DEFAULT_MODEL, load_encoder
from mmret.errors import InputError
from mmret.ingest.pairs import read_pairs
from mmret.ingest.report import SkipReport
from mmret.query_bank import QueryBank, load_query_bank, select_query_bank
from mmret.training.query_bank import build_query_bank

QUERY_BANK_HELP = (
    "Normalise text and image queries' scores with a query bank (fewer hub items): 'auto' "
    "uses the bank that ships for the index's model (starter-v4, starter-v3), 'off' none, or "
    "a folder from `mmret train query-bank`."
)


def query_bank_option(value: str) -> QueryBank | bool:
    """``--query-bank``'s value for :meth:`mmret.Retriever.search`: True (auto), False or a
    bank."""
    if value == "auto":
        return True
    if value == "off":
        return False
    return load_query_bank(value)


def resolve_query_bank(value: str, spec: str, refined: bool) -> QueryBank | None:
    """The bank ``--query-bank`` names for scores of model ``spec`` (``refined``: with a
    memory), as a search of its index would use it."""
    return select_query_bank(query_bank_option(value), spec, refined)


@friendly_errors
def train(
    manifest: Path = typer.Argument(
        ..., help="JSONL/CSV/Parquet manifest of images with captions: the bank's source."
    ),
    dev: Path = typer.Option(..., help="Dev manifest that chooses beta and the weight."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the bank."),
    model: str = typer.Option(DEFAULT_MODEL, help="Encoder whose scores the bank normalises."),
    texts: int = typer.Option(4000, min=1, help="Captions in the bank."),
    images: int = typer.Option(2000, min=1, help="Images in the bank."),
    seed: int = typer.Option(0, help="Seed of the bank's draw."),
    cache_dir: Path | None = typer.Option(
        None, help="Embedding cache (default ~/.cache/mmret/embeddings)."
    ),
) -> None:
    """Build a query bank for a model: normalise its search scores to demote hub items.

    Draws TEXTS captions and IMAGES images of MANIFEST as typical text and image queries,
    then picks the inverted softmax's beta and the discount's weight (0 included: no
    normalisation) with the best RSUM on DEV. Use it with --query-bank OUT.
    """
    encoder = load_encoder(model)
    if encoder.token_dim is not None:
        raise InputError(f"{model} is a multi-vector model; query banks normalise cosines")
    report = SkipReport()
    train_pairs, dev_pairs = read_pairs(manifest, report), read_pairs(dev, report)
    dev_embedded = embed_pairs(
        encoder, dev_pairs, cache_dir=cache_dir, report=report, show_progress=True
    )
    bank = build_query_bank(
        encoder,
        train_pairs,
        dev_embedded,
        texts=texts,
        images=images,
        seed=seed,
        report=report,
        show_progress=True,
    )
    print_skips(report)
    record = {"manifest": str(manifest), "dev": str(dev), **(bank.record or {})}
    bank = replace(bank, record=record)
    bank.save(out)
    for setting, rsum in record["dev_rsum"].items():
        console.print(f"{setting}: dev RSUM {rsum:.1f}", highlight=False)
    console.print(
        f"[green]saved the query bank to {out}[/]: beta {bank.beta:g}, weight {bank.weight:g}",
        highlight=False,
    )
