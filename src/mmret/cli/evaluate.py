"""``mmret eval retrieval``: standard image-text retrieval metrics for any encoder."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.table import Table

from mmret.cli.output import console, friendly_errors, print_skips, status
from mmret.encoders import load_encoder
from mmret.evaluation.embeddings import embed_pairs
from mmret.evaluation.retrieval import retrieval_metrics
from mmret.ingest.report import SkipReport
from mmret.training.features import read_pairs

eval_app = typer.Typer(help="Measure retrieval quality.", no_args_is_help=True)


@eval_app.command("retrieval")
@friendly_errors
def retrieval(
    manifest: Path = typer.Argument(..., help="Manifest of images with captions."),
    model: str = typer.Option("starter", help="Encoder spec."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the report as JSON here."),
    cache_dir: Path | None = typer.Option(None, help="Embedding cache (default ~/.cache/mmret)."),
) -> None:
    """Text-to-image and image-to-text Recall@1/5/10 (Flickr30k/COCO protocol)."""
    started = time.perf_counter()
    report = SkipReport()
    pairs = read_pairs(manifest, report)
    with status(f"Loading encoder {model}..."):
        encoder = load_encoder(model)
    embeddings = embed_pairs(encoder, pairs, cache_dir=cache_dir, report=report, show_progress=True)
    metrics = retrieval_metrics(embeddings.image, embeddings.text, embeddings.text_image)
    print_skips(report)
    result = {**metrics.to_dict(), "model": encoder.spec, "seconds": time.perf_counter() - started}
    sizes = f"{metrics.n_images} images, {metrics.n_texts} texts"
    table = Table(title=f"{manifest.name}: {sizes} ({encoder.spec})")
    for column in ("direction", "R@1", "R@5", "R@10", "median rank"):
        table.add_column(column, justify="right")
    table.add_row(
        "text→image",
        *(f"{v:.1f}" for v in metrics.text_to_image.values()),
        f"{metrics.median_rank_text_to_image:.0f}",
    )
    table.add_row(
        "image→text",
        *(f"{v:.1f}" for v in metrics.image_to_text.values()),
        f"{metrics.median_rank_image_to_text:.0f}",
    )
    console.print(table)
    console.print(f"RSUM {metrics.rsum:.1f}  ({result['seconds']:.1f} s)")
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2) + "\n")
