"""``mmret train align`` and ``mmret train hat``: train the heads on frozen tower features."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import typer

from mmret._files import default_cache_dir
from mmret.cache.layer_features import LayerFeatureSet, layer_feature_set
from mmret.cache.tower_features import pair_features
from mmret.cli.output import ReflowedHelp, console, friendly_errors, print_saved, print_skips
from mmret.encoders import Encoder, load_encoder
from mmret.encoders.starter import StarterEncoder
from mmret.encoders.towers import TOWERS, StarterTowers
from mmret.evaluation.retrieval import RetrievalReport
from mmret.ingest.pairs import read_pairs
from mmret.ingest.report import SkipReport
from mmret.layers import resolve_layers
from mmret.training.align import AlignTrainingConfig, train_alignment
from mmret.training.crossfit import retrainable
from mmret.training.hat import HatEpochLog, HatTrainingConfig, train_hat
from mmret.training.knowledge import imagenet_knowledge, imagenet_level_knowledge
from mmret.training.loop import EpochLog
from mmret.training.record import write_training_record
from mmret.training.ret import (
    CROSS_FIT,
    RetEpochLog,
    RetTrainingConfig,
    cross_fitted_head_vectors,
    train_ret,
)

train_app = typer.Typer(
    cls=ReflowedHelp, help="Train the small heads that make retrieval better.", no_args_is_help=True
)


def epoch_line(epoch: int, loss: float, dev: RetrievalReport | None) -> str:
    line = f"epoch {epoch:3d}  loss {loss:.4f}"
    if dev is not None:
        t2i, i2t = dev.text_to_image, dev.image_to_text
        line += (
            f"  dev t2i R@1 {t2i['R@1']:.1f} R@10 {t2i['R@10']:.1f}"
            f"  i2t R@1 {i2t['R@1']:.1f}  RSUM {dev.rsum:.1f}"
        )
    return line


def show_epoch(log: EpochLog) -> None:
    """One line per training epoch: the loss and, with a dev set, its recalls and RSUM."""
    console.print(epoch_line(log.epoch, log.loss, log.dev), highlight=False)


def imagenet_weight_option(default: float) -> Any:
    """``--imagenet-weight``, shared by the heads that can distil the ImageNet classifier."""
    return typer.Option(
        default,
        min=0.0,
        help="Weight of distilling the image tower's ImageNet classifier (0: off).",
    )


def imagenet_temperature_option(default: float) -> Any:
    """``--imagenet-temperature``, shared like :func:`imagenet_weight_option`."""
    return typer.Option(
        default,
        min=0.01,
        help="Temperature softening the ImageNet classifier's scores before distilling.",
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
    imagenet_weight: float = imagenet_weight_option(AlignTrainingConfig.imagenet_weight),
    imagenet_temperature: float = imagenet_temperature_option(
        AlignTrainingConfig.imagenet_temperature
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

    head, logs = train_alignment(
        train, dev_features, config, knowledge=knowledge, on_epoch=show_epoch
    )
    head.save(out, dtype=torch.float16 if float16 else None)
    history = [log.to_dict() for log in logs]
    write_training_record(out, manifest=manifest, dev=dev, config=config.to_dict(), history=history)
    print_saved("alignment head", out, f"--model starter:{out}")


def parse_layers(text: str, option: str) -> tuple[int, ...]:
    """``"5,7,-1"`` -> ``(5, 7, -1)``."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not a comma-separated list of layer numbers (e.g. 5,7,8)",
            param_hint=option,
        ) from None


def resolved_layers(
    encoder: Encoder, image: tuple[int, ...], text: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Layer numbers made non-negative: stored layers are numbered from 0, so -1 and friends
    are resolved once, before anything is stored or configured."""
    return (
        resolve_layers(image, encoder.image_layer_count, "image"),
        resolve_layers(text, encoder.text_layer_count, "text"),
    )


def stored_sets(
    encoder: Encoder,
    manifest: Path,
    dev: Path | None,
    image_layers: tuple[int, ...],
    text_layers: tuple[int, ...],
    cache_dir: Path | None,
) -> tuple[LayerFeatureSet, LayerFeatureSet | None]:
    """The stored layer features of the training and (optional) dev manifests, extracting
    what is missing with progress bars, then the entries skipped."""
    report = SkipReport()

    def stored(path: Path) -> LayerFeatureSet:
        return layer_feature_set(
            read_pairs(path, report),
            encoder,
            image_layers,
            text_layers,
            cache_dir=cache_dir,
            report=report,
            show_progress=True,
        )

    train_set = stored(manifest)
    dev_set = stored(dev) if dev is not None else None
    print_skips(report)
    return train_set, dev_set


@train_app.command("hat")
@friendly_errors
def hat(
    manifest: Path = typer.Argument(
        ..., help="JSONL/CSV/Parquet manifest of images with captions."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Folder for the head (and its per-epoch checkpoint)."
    ),
    dev: Path | None = typer.Option(None, help="Dev manifest: report each epoch, keep the best."),
    backbone: str = typer.Option("starter", help="Encoder whose layer features HAT aligns."),
    image_layers: str = typer.Option(
        ",".join(map(str, HatTrainingConfig.image_layers)),
        help="Image layer of each level, comma-separated (0 = stem, -1 = last).",
    ),
    text_layers: str = typer.Option(
        ",".join(map(str, HatTrainingConfig.text_layers)),
        help="Text layer of each level, comma-separated (0 = embeddings, -1 = last).",
    ),
    learn_weights: bool = typer.Option(
        HatTrainingConfig.learn_weights, help="Learn the level weights (else uniform)."
    ),
    level_loss: float = typer.Option(
        HatTrainingConfig.level_loss, min=0.0, help="Weight of the per-level losses."
    ),
    epochs: int = typer.Option(HatTrainingConfig.epochs, min=1),
    embed_dim: int = typer.Option(HatTrainingConfig.embed_dim, min=8, help="Width per level."),
    hidden_dim: int = typer.Option(HatTrainingConfig.hidden_dim, min=0, help="0: linear."),
    dropout: float = typer.Option(HatTrainingConfig.dropout, min=0.0, max=0.9),
    weight_decay: float = typer.Option(HatTrainingConfig.weight_decay, min=0.0),
    batch_size: int = typer.Option(HatTrainingConfig.batch_size, min=2),
    learning_rate: float = typer.Option(HatTrainingConfig.learning_rate, min=0.0),
    seed: int = typer.Option(HatTrainingConfig.seed),
    imagenet_weight: float = imagenet_weight_option(HatTrainingConfig.imagenet_weight),
    imagenet_temperature: float = imagenet_temperature_option(
        HatTrainingConfig.imagenet_temperature
    ),
    cache_dir: Path | None = typer.Option(
        None, help="Layer feature store (default ~/.cache/mmret/layers)."
    ),
    float16: bool = typer.Option(False, help="Store weights in float16 (half the file size)."),
) -> None:
    """Train a HAT hierarchical alignment head on stored layer features (resumable)."""
    config = HatTrainingConfig(
        image_layers=parse_layers(image_layers, "--image-layers"),
        text_layers=parse_layers(text_layers, "--text-layers"),
        embed_dim=embed_dim,
        hidden_dim=hidden_dim,
        dropout=dropout,
        learn_weights=learn_weights,
        level_loss=level_loss,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        seed=seed,
        imagenet_weight=imagenet_weight,
        imagenet_temperature=imagenet_temperature,
    )
    encoder = load_encoder(backbone)
    image, text = resolved_layers(encoder, config.image_layers, config.text_layers)
    config = replace(config, image_layers=image, text_layers=text)
    # Distilling reads the classifier's input, the last image layer, for every training image.
    stored_image = tuple(sorted({*image, encoder.image_layer_count})) if imagenet_weight else image
    train_set, dev_set = stored_sets(encoder, manifest, dev, stored_image, text, cache_dir)
    knowledge = None
    if imagenet_weight > 0:
        knowledge = imagenet_level_knowledge(encoder, train_set, text, show_progress=True)

    def show(log: HatEpochLog) -> None:
        weights = " ".join(f"{w:.2f}" for w in log.weights)
        console.print(f"{epoch_line(log.epoch, log.loss, log.dev)}  weights {weights}")

    head, history = train_hat(
        train_set,
        dev_set,
        config,
        backbone=backbone,
        layer_source=encoder.layer_source,
        checkpoint_dir=out / "checkpoint",
        knowledge=knowledge,
        on_epoch=show,
        show_progress=True,
    )
    head.save(out, dtype=torch.float16 if float16 else None)
    write_training_record(
        out, manifest=manifest, dev=dev, backbone=backbone, config=config.to_dict(), history=history
    )
    print_saved("HAT head", out, f"--model hat:{out}")


@train_app.command("ret")
@friendly_errors
def ret(
    manifest: Path = typer.Argument(
        ..., help="JSONL/CSV/Parquet manifest of images with captions."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Folder for the model (and its per-epoch checkpoint)."
    ),
    dev: Path | None = typer.Option(None, help="Dev manifest: report each epoch, keep the best."),
    backbone: str = typer.Option("starter", help="Encoder whose layer features ReT fuses."),
    image_layers: str = typer.Option(
        ",".join(map(str, RetTrainingConfig.image_layers)),
        help="Image layer read at each step, comma-separated (0 = stem, -1 = last).",
    ),
    text_layers: str = typer.Option(
        ",".join(map(str, RetTrainingConfig.text_layers)),
        help="Text layer read at each step, comma-separated (0 = embeddings, -1 = last).",
    ),
    tokens: int = typer.Option(RetTrainingConfig.tokens, min=1, help="Latent tokens per input."),
    token_dim: int = typer.Option(RetTrainingConfig.token_dim, min=1, help="Width of a token."),
    width: int = typer.Option(RetTrainingConfig.width, min=8, help="Width inside the cell."),
    heads: int = typer.Option(RetTrainingConfig.heads, min=1, help="Attention heads."),
    gates: bool = typer.Option(
        RetTrainingConfig.gates, help="Gated updates (else a plain residual transformer)."
    ),
    shared: bool = typer.Option(
        RetTrainingConfig.shared, help="One model for queries and documents (else two)."
    ),
    global_path: bool = typer.Option(
        RetTrainingConfig.global_path,
        help="Add each modality's pooled last layer to every token (else latents alone).",
    ),
    task_weights: str = typer.Option(
        ",".join(f"{w:g}" for w in RetTrainingConfig.task_weights),
        help="Relative frequency of the tasks text>image, image>text, text>image+text.",
    ),
    epochs: int = typer.Option(RetTrainingConfig.epochs, min=1),
    dropout: float = typer.Option(RetTrainingConfig.dropout, min=0.0, max=0.9),
    weight_decay: float = typer.Option(RetTrainingConfig.weight_decay, min=0.0),
    batch_size: int = typer.Option(RetTrainingConfig.batch_size, min=2),
    learning_rate: float = typer.Option(RetTrainingConfig.learning_rate, min=0.0),
    seed: int = typer.Option(RetTrainingConfig.seed),
    cross_fit: int | None = typer.Option(
        None,
        min=0,
        help="Train on the global path's vectors from alignments retrained on K-1 of K folds "
        "(each never saw the row it embeds); 0: the backbone's own head. Default: 5 when the "
        "backbone's alignment can be retrained (a starter model) and the global path is on, "
        "else 0.",
    ),
    hard_batches: bool = typer.Option(
        RetTrainingConfig.hard_batches,
        help="Batches of images the cross-fitted head finds alike (needs --cross-fit).",
    ),
    threads: int = typer.Option(0, min=0, help="CPU threads for torch (0: its default)."),
    cache_dir: Path | None = typer.Option(
        None, help="Layer feature store (default ~/.cache/mmret/layers)."
    ),
    float16: bool = typer.Option(False, help="Store weights in float16 (half the file size)."),
) -> None:
    """Train a ReT model (query and document sides) on stored layer features (resumable)."""
    if threads:
        torch.set_num_threads(threads)
    try:
        weights = tuple(float(part) for part in task_weights.split(","))
    except ValueError:
        raise typer.BadParameter(
            f"{task_weights!r} is not a comma-separated list of numbers (e.g. 2,1,1)",
            param_hint="--task-weights",
        ) from None
    encoder = load_encoder(backbone)
    if cross_fit is None:
        cross_fit = CROSS_FIT if global_path and retrainable(encoder) else 0
    config = RetTrainingConfig(
        image_layers=parse_layers(image_layers, "--image-layers"),
        text_layers=parse_layers(text_layers, "--text-layers"),
        tokens=tokens,
        token_dim=token_dim,
        width=width,
        heads=heads,
        gates=gates,
        shared=shared,
        global_path=global_path,
        dropout=dropout,
        task_weights=weights,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        seed=seed,
        cross_fit=cross_fit,
        hard_batches=hard_batches,
    )
    image, text = resolved_layers(encoder, config.image_layers, config.text_layers)
    config = replace(config, image_layers=image, text_layers=text)
    train_set, dev_set = stored_sets(encoder, manifest, dev, image, text, cache_dir)
    head_vectors = None
    if cross_fit:
        head_vectors = cross_fitted_head_vectors(encoder, train_set, config, show_progress=True)

    def show(log: RetEpochLog) -> None:
        console.print(epoch_line(log.epoch, log.loss, log.dev), highlight=False)

    model, history = train_ret(
        train_set,
        dev_set,
        config,
        backbone=backbone,
        layer_source=encoder.layer_source,
        checkpoint_dir=out / "checkpoint",
        on_epoch=show,
        show_progress=True,
        # A starter backbone's alignment head reads the towers' last layers: the global path.
        global_head=encoder.head if isinstance(encoder, StarterEncoder) else None,
        head_vectors=head_vectors,
    )
    model.save(out, dtype=torch.float16 if float16 else None)
    write_training_record(
        out, manifest=manifest, dev=dev, backbone=backbone, config=config.to_dict(), history=history
    )
    print_saved("ReT model", out, f"--model ret:{out}")
