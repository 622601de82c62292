"""``mmret train rerank``: the joint bi-encoder and cross-encoder (MMT-Retrieval)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import typer

from mmret.cli.output import console, friendly_errors, print_skips
from mmret.cli.train import epoch_line
from mmret.encoders import load_encoder
from mmret.encoders.layers import resolve_layers
from mmret.ingest.report import SkipReport
from mmret.training.feature_store import LayerFeatureSet, layer_feature_set
from mmret.training.features import read_pairs
from mmret.training.rerank import RerankEpochLog, RerankTrainingConfig, train_rerank

DEFAULTS = RerankTrainingConfig()


@friendly_errors
def train(
    manifest: Path = typer.Argument(
        ..., help="JSONL/CSV/Parquet manifest of images with captions."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Folder for the model (and its per-epoch checkpoint)."
    ),
    dev: Path | None = typer.Option(
        None, help="Dev manifest: rerank a sample each epoch and keep the best epoch."
    ),
    backbone: str = typer.Option("starter", help="Encoder whose frozen towers give the tokens."),
    image_layer: int = typer.Option(DEFAULTS.image_layer, help="Image layer (-1 = last)."),
    text_layer: int = typer.Option(DEFAULTS.text_layer, help="Text layer (-1 = last)."),
    image_grid: int = typer.Option(
        DEFAULTS.image_grid, min=1, help="Image maps are pooled to GRID x GRID tokens."
    ),
    joint: bool = typer.Option(
        DEFAULTS.joint,
        help="Share the token projections and add the bi-encoder's cosine to the score "
        "(--no-joint: two separately trained models, the ablation).",
    ),
    warmup_epochs: int = typer.Option(
        DEFAULTS.warmup_epochs, min=1, help="Bi-encoder-only epochs before mining negatives."
    ),
    epochs: int = typer.Option(DEFAULTS.epochs, min=1, help="Joint epochs (mining each)."),
    queries_per_epoch: int = typer.Option(
        DEFAULTS.queries_per_epoch, min=2, help="Cross-encoder queries per joint epoch."
    ),
    negatives: int = typer.Option(DEFAULTS.negatives, min=1, help="Hard negatives per query."),
    mine_top: int = typer.Option(
        DEFAULTS.mine_top, min=2, help="Negatives are drawn from each query's top MINE_TOP."
    ),
    width: int = typer.Option(DEFAULTS.width, min=8, help="Cross-encoder transformer width."),
    layers: int = typer.Option(DEFAULTS.layers, min=1, help="Cross-encoder transformer layers."),
    learning_rate: float = typer.Option(DEFAULTS.learning_rate, min=0.0),
    seed: int = typer.Option(DEFAULTS.seed),
    cache_dir: Path | None = typer.Option(
        None, help="Layer feature store (default ~/.cache/mmret/layers)."
    ),
    float16: bool = typer.Option(False, help="Store weights in float16 (half the file size)."),
) -> None:
    """Train a cross-encoder reranker jointly with its bi-encoder on stored token features.

    Resumable: the same command run again continues after the last finished epoch.
    """
    encoder = load_encoder(backbone)
    image_layer = resolve_layers([image_layer], encoder.image_layer_count, "image")[0]
    text_layer = resolve_layers([text_layer], encoder.text_layer_count, "text")[0]
    config = RerankTrainingConfig(
        image_layer=image_layer,
        text_layer=text_layer,
        image_grid=image_grid,
        joint=joint,
        warmup_epochs=warmup_epochs,
        epochs=epochs,
        queries_per_epoch=queries_per_epoch,
        negatives=negatives,
        mine_top=mine_top,
        width=width,
        layers=layers,
        learning_rate=learning_rate,
        seed=seed,
    )
    report = SkipReport()

    def stored(path: Path) -> LayerFeatureSet:
        return layer_feature_set(
            read_pairs(path, report),
            encoder,
            [image_layer],
            [text_layer],
            cache_dir=cache_dir,
            report=report,
            show_progress=True,
        )

    train_set = stored(manifest)
    dev_set = stored(dev) if dev is not None else None
    print_skips(report)

    def show(log: RerankEpochLog) -> None:
        line = epoch_line(log.epoch, log.loss, log.dev)
        if log.reranked is not None:
            t2i = log.reranked.report.text_to_image
            line += f"  | reranked top {log.reranked.n}: t2i R@1 {t2i['R@1']:.1f}"
            line += f" RSUM {log.reranked.report.rsum:.1f} (dev sample)"
        console.print(line, highlight=False)

    model, history = train_rerank(
        train_set,
        dev_set,
        config,
        backbone=backbone,
        layer_source=encoder.layer_source,
        checkpoint_dir=out / "checkpoint",
        on_epoch=show,
        show_progress=True,
    )
    model.save(out, dtype=torch.float16 if float16 else None)
    document = {
        "manifest": str(manifest),
        "dev": str(dev) if dev else None,
        "backbone": backbone,
        "config": config.to_dict(),
        "history": history,
    }
    (out / "training.json").write_text(json.dumps(document, indent=2) + "\n")
    console.print(f"[green]saved reranker to {out}[/] (use it with --rerank N --reranker {out})")
