"""``mmret train align``: train the starter model's alignment projections."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import typer

from mmret.cli.output import console, friendly_errors, print_skips
from mmret.encoders.towers import TOWERS, StarterTowers
from mmret.ingest.report import SkipReport
from mmret.training.align import AlignTrainingConfig, EpochLog, train_alignment
from mmret.training.features import default_cache_dir, pair_features, read_pairs
from mmret.training.knowledge import imagenet_knowledge

train_app = typer.Typer(
    help="Train the small heads that make retrieval better.", no_args_is_help=True
)


@train_app.command("align")
@friendly_errors
def align(
    manifest: Path = typer.Argument(
        ..., help="JSONL/CSV/Parquet manifest of images with captions."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the trained head."),
    dev: Path | None = typer.Option(None, help="Dev manifest: report each epoch, keep the best."),
    epochs: int = typer.Option(AlignTrainingConfig.epochs, min=1),
    embed_dim: int = typer.Option(AlignTrainingConfig.embed_dim, min=8),
    hidden_dim: int = typer.Option(AlignTrainingConfig.hidden_dim, min=0, help="0: linear."),
    dropout: float = typer.Option(AlignTrainingConfig.dropout, min=0.0, max=0.9),
    weight_decay: float = typer.Option(AlignTrainingConfig.weight_decay, min=0.0),
    batch_size: int = typer.Option(AlignTrainingConfig.batch_size, min=2),
    learning_rate: float = typer.Option(AlignTrainingConfig.learning_rate, min=0.0),
    seed: int = typer.Option(AlignTrainingConfig.seed),
    towers: str = typer.Option(
        TOWERS, help="Tower pair IMAGE+TEXT, e.g. efficientnet-lite2+all-MiniLM-L6-v2."
    ),
    imagenet_weight: float = typer.Option(
        AlignTrainingConfig.imagenet_weight,
        min=0.0,
        help="Weight of distilling the image tower's ImageNet classifier (0: off).",
    ),
    imagenet_temperature: float = typer.Option(
        AlignTrainingConfig.imagenet_temperature,
        min=0.01,
        help="Temperature softening the ImageNet classifier's scores before distilling.",
    ),
    cache_dir: Path | None = typer.Option(None, help="Feature cache (default ~/.cache/mmret)."),
    float16: bool = typer.Option(False, help="Store weights in float16 (half the file size)."),
) -> None:
    """Train alignment projections on frozen, cached tower features (symmetric InfoNCE)."""
    config = AlignTrainingConfig(
        embed_dim=embed_dim,
        hidden_dim=hidden_dim,
        dropout=dropout,
        weight_decay=weight_decay,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        towers=towers,
        imagenet_weight=imagenet_weight,
        imagenet_temperature=imagenet_temperature,
    )
    report = SkipReport()
    tower_pair = StarterTowers(towers)
    cache = cache_dir or default_cache_dir()
    train = pair_features(
        read_pairs(manifest, report),
        cache_dir=cache,
        towers=tower_pair,
        report=report,
        show_progress=True,
    )
    dev_features = None
    if dev is not None:
        dev_features = pair_features(
            read_pairs(dev, report),
            cache_dir=cache,
            towers=tower_pair,
            report=report,
            show_progress=True,
        )
    print_skips(report)
    knowledge = None
    if imagenet_weight > 0:
        knowledge = imagenet_knowledge(tower_pair, train, cache_dir=cache, show_progress=True)

    def show(log: EpochLog) -> None:
        line = f"epoch {log.epoch:3d}  loss {log.loss:.4f}"
        if log.dev is not None:
            t2i, i2t = log.dev.text_to_image, log.dev.image_to_text
            line += (
                f"  dev t2i R@1 {t2i['R@1']:.1f} R@10 {t2i['R@10']:.1f}"
                f"  i2t R@1 {i2t['R@1']:.1f}  RSUM {log.dev.rsum:.1f}"
            )
        console.print(line, highlight=False)

    head, logs = train_alignment(train, dev_features, config, knowledge=knowledge, on_epoch=show)
    head.save(out, dtype=torch.float16 if float16 else None)
    history = [
        {"epoch": log.epoch, "loss": log.loss, "dev": log.dev.to_dict() if log.dev else None}
        for log in logs
    ]
    (out / "training.json").write_text(
        json.dumps(
            {
                "manifest": str(manifest),
                "dev": str(dev) if dev else None,
                "config": config.to_dict(),
                "history": history,
            },
            indent=2,
        )
    )
    console.print(f"[green]saved alignment head to {out}[/] (use it with --model starter:{out})")
