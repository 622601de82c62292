"""``mmret train rerank``: the joint bi-encoder and cross-encoder (MMT-Retrieval), and
``mmret train rerank-calibrate``: its weight for another first stage's scores."""

from __future__ import annotations

from pathlib import Path

import torch
import typer

from mmret.cache.embeddings import PairEmbeddings, embed_pairs
from mmret.cache.layer_features import LayerFeatureSet, layer_feature_set
from mmret.cli.output import console, friendly_errors, print_skips
from mmret.cli.query_bank import resolve_query_bank
from mmret.cli.train import epoch_line
from mmret.encoders import DEFAULT_MODEL, Encoder, load_encoder
from mmret.errors import InputError
from mmret.ingest.pairs import read_pairs
from mmret.ingest.report import SkipReport
from mmret.late_interaction import similarity
from mmret.layers import resolve_layers
from mmret.reranker import (
    FIRST_STAGE_FILE,
    first_stage_name,
    load_reranker,
    write_first_stage_weight,
)
from mmret.training.calibration import calibrate_first_stage_weight
from mmret.training.cross_encoder import (
    RerankEpochLog,
    RerankTrainingConfig,
    dev_sample,
    train_rerank,
    training_config,
)
from mmret.training.cross_encoder_data import RerankData
from mmret.training.record import write_training_record

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
    calibrate: bool = typer.Option(
        True, help="With --dev, calibrate the saved model for each --first-stage afterwards."
    ),
    first_stage: list[str] = typer.Option(
        [DEFAULT_MODEL],
        "--first-stage",
        help="Model whose indexes the reranker will rerank (repeatable; see rerank-calibrate).",
    ),
) -> None:
    """Train a cross-encoder reranker jointly with its bi-encoder on stored token features.

    Resumable: the same command run again continues after the last finished epoch. With --dev
    the saved model is then calibrated for the first stage of --first-stage's indexes (as
    `mmret train rerank-calibrate` does).
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
    write_training_record(
        out, manifest=manifest, dev=dev, backbone=backbone, config=config.to_dict(), history=history
    )
    console.print(f"[green]saved reranker to {out}[/] (use it with --rerank N --reranker {out})")
    if calibrate and dev is not None:
        for model_spec in first_stage:
            calibrate_folder(out, dev, model_spec, config.rerank_n, layers=cache_dir)


@friendly_errors
def calibrate(
    reranker: Path = typer.Argument(..., help="Reranker folder (from `mmret train rerank`)."),
    dev: Path = typer.Option(..., help="Dev manifest of images with captions."),
    first_stage: str = typer.Option(
        DEFAULT_MODEL, help="The model whose indexes' first stage the reranker will rerank."
    ),
    n: int = typer.Option(20, min=2, help="Candidates reranked per query while calibrating."),
    cache_dir: Path | None = typer.Option(
        None, help="Cache for layer features and embeddings (default ~/.cache/mmret)."
    ),
    query_bank: str = typer.Option(
        "auto",
        "--query-bank",
        help="The first stage's query bank (as its searches use it): 'auto', 'off' or a folder.",
    ),
) -> None:
    """Calibrate the weight of a first stage's scores in the reranker's score.

    On an index built with FIRST_STAGE, `--rerank N` then ranks candidates by the reranker's
    score plus this weight times the first stage's score: the weight (of 0, 5, ..., 50) whose
    reranked top N give the best sum of R@1/5/10 both ways on the dev sample that training
    chose its epoch on (500 captions, 100 images). Recorded in first_stage.json in the folder.
    """
    calibrate_folder(
        reranker,
        dev,
        first_stage,
        n,
        layers=cache_dir / "layers" if cache_dir else None,
        embeddings=cache_dir / "embeddings" if cache_dir else None,
        query_bank=query_bank,
    )


def calibrate_folder(
    reranker: Path,
    dev: Path,
    first_stage: str,
    n: int = 20,
    *,
    layers: Path | None = None,
    embeddings: Path | None = None,
    query_bank: str = "auto",
) -> None:
    """Calibrate the reranker in ``reranker`` for ``first_stage`` on ``dev`` and say what was
    chosen (``layers`` and ``embeddings``: caches, default under ~/.cache/mmret;
    ``query_bank``: as ``--query-bank``, the first stage's normalisation)."""
    model = load_reranker(reranker)
    config = model.model.config
    report = SkipReport()
    pairs = read_pairs(dev, report)
    features = layer_feature_set(
        pairs,
        model.backbone,
        [config.image_layer],
        [config.text_layer],
        cache_dir=layers,
        report=report,
        show_progress=True,
    )
    encoder = load_encoder(first_stage)

    def embedded(side: Encoder) -> PairEmbeddings:
        return embed_pairs(side, pairs, cache_dir=embeddings, report=report, show_progress=True)

    documents = embedded(encoder)
    queries = documents if encoder.for_queries() is encoder else embedded(encoder.for_queries())
    print_skips(report)
    if len(documents.image) != len(features.image_ids):
        raise InputError(f"{dev}: the first stage and the token features kept different images")
    sampling = training_config(reranker) or DEFAULTS
    captions, images = dev_sample(sampling, len(documents.text), len(documents.image))
    bank = resolve_query_bank(query_bank, encoder.spec, refined=False)
    image_offset, text_offset = (
        bank.offsets(documents.image, documents.text) if bank else (0.0, 0.0)
    )
    weight, recall_sums = calibrate_first_stage_weight(
        model.model,
        RerankData(features, config),
        similarity(queries.text[captions], documents.image, encoder.token_dim) - image_offset,
        similarity(queries.image[images], documents.text, encoder.token_dim) - text_offset,
        captions,
        images,
        n,
    )
    record = {
        "dev": str(dev),
        "captions": len(captions),
        "images": len(images),
        "n": n,
        "rsum_by_weight": {f"{w:g}": round(r, 2) for w, r in recall_sums.items()},
    }
    name = first_stage_name(encoder.spec, refined=False, query_bank=bank is not None)
    write_first_stage_weight(reranker, name, weight, record)
    for w, r in recall_sums.items():
        mark = "  <- chosen" if w == weight else ""
        console.print(f"weight {w:>4g}: RSUM {r:.1f} (dev sample, top {n}){mark}", highlight=False)
    console.print(
        f"[green]{reranker / FIRST_STAGE_FILE}: {name} first stage weighted {weight:g}[/]",
        highlight=False,
    )
