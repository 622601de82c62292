"""``mmret memory build | info``, ``mmret train reco``, and the ``--memory`` options of the
commands that encode (index, search, eval)."""

from __future__ import annotations

import shutil
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
import typer

from mmret.cli.output import console, friendly_errors, print_json, print_saved, print_skips, status
from mmret.cli.train import show_epoch
from mmret.encoders import DEFAULT_MODEL, load_encoder
from mmret.errors import InputError
from mmret.ingest.pairs import read_pairs
from mmret.ingest.report import SkipReport
from mmret.memory.pair_embeddings import embed_pair_set, first_caption_rows, first_captions
from mmret.memory.refine import Refiner, load_refiner
from mmret.memory.store import Memory, build_memory
from mmret.training.crossfit import cross_fitted_folds
from mmret.training.reco import (
    CHECKPOINT,
    RecoData,
    RecoFold,
    RecoTrainingConfig,
    reco_data,
    train_reco,
)
from mmret.training.record import write_training_record

memory_app = typer.Typer(
    help="RECO memories: image-text pairs that refine embeddings at search time.",
    no_args_is_help=True,
)

MEMORY_HELP = (
    "RECO memory folder (`mmret memory build`): refine embeddings with it. An index built "
    "with a memory is always searched with it (its queries are refined too)."
)
FUSION_HELP = "With --memory: transformer (the trained fusion shipped for the model), mean, or DIR."
MEMORY_K_HELP = "With --memory: neighbours fused per embedding."
SEARCH_HELP = (
    "With --memory: uni (an image finds memory images and takes their texts) or cross "
    "(an image finds memory texts)."
)
THRESHOLD_HELP = "With --memory: never use pairs at least this similar to the query."
CACHE_HELP = "Cache folder for embeddings (default ~/.cache/mmret or $MMRET_CACHE)."


def open_refiner(
    memory: Path | None, fusion: str, k: int, search: str, threshold: float = 0.95
) -> Refiner | None:
    """The refiner the ``--memory`` options describe (None without ``--memory``)."""
    if memory is None:
        return None
    with status(f"Opening memory {memory}..."):
        return load_refiner(memory, fusion, k=k, search=search, threshold=threshold)


@memory_app.command("build")
@friendly_errors
def build(
    manifest: Path = typer.Argument(
        ..., help="JSONL/CSV/Parquet manifest of images with captions."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Memory folder to create."),
    model: str = typer.Option(
        DEFAULT_MODEL, help=f"Encoder spec: {DEFAULT_MODEL} (the default), starter, hf:NAME, ..."
    ),
    backend: str = typer.Option(
        "auto", help="Index backend: auto, exact or faiss (auto: exact below 100k pairs)."
    ),
    cache_dir: Path | None = typer.Option(None, help=CACHE_HELP),
    max_captions: int | None = typer.Option(
        None, min=1, help="Use only the first N captions of each entry (default: all)."
    ),
) -> None:
    """Embed every image-caption pair of MANIFEST with both towers and store them as a memory.

    Each entry with an image and at least one caption becomes one pair (several captions:
    their mean text vector). Embeddings are cached, so a set already embedded costs nothing.
    """
    report = SkipReport()
    with status(f"Loading encoder {model}..."):
        encoder = load_encoder(model)
    build_memory(
        manifest,
        out,
        encoder=encoder,
        backend=backend,
        cache_dir=cache_dir,
        report=report,
        show_progress=True,
        max_captions=max_captions,
    )
    print_skips(report)
    with Memory.open(out) as memory:
        console.print(
            f"[green]built memory {out}[/]: {len(memory)} pairs, identity {memory.identity}, "
            f"{memory.footprint_bytes() / 2**20:.1f} MiB"
        )


@memory_app.command("info")
@friendly_errors
def info(
    folder: Path = typer.Argument(..., metavar="DIR", help="Memory folder."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Describe a memory: pairs, encoder, identity and size on disk."""
    with Memory.open(folder) as memory:
        details = {
            "path": str(folder),
            **memory.manifest.to_dict(),
            "bytes": memory.footprint_bytes(),
        }
    if as_json:
        print_json(details)
        return
    for key, value in details.items():
        console.print(f"[bold]{key:>15}[/]  {value}")


@friendly_errors
def train(
    manifest: Path = typer.Argument(
        ..., help="JSONL/CSV/Parquet manifest of training images with captions."
    ),
    memory: Path = typer.Option(..., "--memory", help="Memory folder (`mmret memory build`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the trained fusion."),
    dev: Path | None = typer.Option(None, help="Dev manifest: report each epoch, keep the best."),
    k: int = typer.Option(RecoTrainingConfig.k, min=1, help="Neighbours fused per embedding."),
    search: str = typer.Option(RecoTrainingConfig.search, help="uni or cross (see --memory)."),
    threshold: float = typer.Option(RecoTrainingConfig.threshold, help=THRESHOLD_HELP),
    epochs: int = typer.Option(RecoTrainingConfig.epochs, min=1),
    ff_dim: int = typer.Option(RecoTrainingConfig.ff_dim, min=1),
    heads: int = typer.Option(RecoTrainingConfig.heads, min=1),
    dropout: float = typer.Option(RecoTrainingConfig.dropout, min=0.0, max=0.9),
    batch_size: int = typer.Option(RecoTrainingConfig.batch_size, min=2),
    learning_rate: float = typer.Option(RecoTrainingConfig.learning_rate, min=0.0),
    weight_decay: float = typer.Option(RecoTrainingConfig.weight_decay, min=0.0),
    seed: int = typer.Option(RecoTrainingConfig.seed),
    cross_fit: int = typer.Option(
        RecoTrainingConfig.cross_fit,
        min=0,
        help="Train on K cross-fitted folds: an alignment retrained per fold embeds the "
        "fold's pairs, unseen, against a memory of the others (for a model trained on "
        "MANIFEST, with a memory of MANIFEST's pairs). 0: off.",
    ),
    max_captions: int | None = typer.Option(
        None, min=1, help="Use the first N captions of each training and dev image (default: all)."
    ),
    resume: bool = typer.Option(False, help="Continue the unfinished run saved in OUT."),
    cache_dir: Path | None = typer.Option(None, help=CACHE_HELP),
    float16: bool = typer.Option(False, help="Store weights in float16 (half the file size)."),
) -> None:
    """Train the RECO fusion on frozen, cached embeddings of MANIFEST.

    Loss: NCE(refined images, refined texts) + NCE(refined images, texts) + NCE(images,
    refined texts). A training item's own pair and its near-duplicates are never among its
    neighbours. Each epoch is checkpointed in OUT/checkpoint; --resume continues from it.
    """
    if search not in ("uni", "cross"):
        raise InputError(f"--search must be uni or cross, got {search!r}")
    config = RecoTrainingConfig(
        k=k,
        search="cross" if search == "cross" else "uni",
        threshold=threshold,
        heads=heads,
        ff_dim=ff_dim,
        dropout=dropout,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        seed=seed,
        cross_fit=cross_fit,
    )
    checkpoint = out / CHECKPOINT
    if checkpoint.exists() and not resume:
        raise InputError(
            f"{out} holds a checkpoint of an earlier run: --resume to continue it, or "
            "choose another --out"
        )
    report = SkipReport()
    with Memory.open(memory) as opened, ExitStack() as stack:
        with status(f"Loading encoder {opened.manifest.encoder}..."):
            encoder = load_encoder(opened.manifest.encoder)
        pairs = read_pairs(manifest, report)
        train_data: RecoData | list[RecoFold]
        if cross_fit:
            train_data = stack.enter_context(
                cross_fitted_folds(
                    encoder,
                    pairs,
                    first_caption_rows(pairs, max_captions),
                    opened,
                    config,
                    cache_dir=cache_dir,
                    show_progress=True,
                )
            )
            # A fold's memory holds the other folds' pairs only: every own pair is left out.
            own_excluded = int(np.sum(opened.rows_of(pairs.image_ids) >= 0))
        else:
            embedded = embed_pair_set(
                encoder,
                first_captions(pairs, max_captions),
                cache_dir=cache_dir,
                report=report,
                show_progress=True,
            )
            own_rows = opened.rows_of(embedded.image_ids)
            with status("Searching the memory for every training image and caption..."):
                train_data = reco_data(embedded.embeddings, opened, config, own_rows=own_rows)
            own_excluded = int(np.sum(own_rows >= 0))
        dev_data = None
        if dev is not None:
            dev_embedded = embed_pair_set(
                encoder,
                first_captions(read_pairs(dev, report), max_captions),
                cache_dir=cache_dir,
                report=report,
                show_progress=True,
            )
            with status("Searching the memory for every dev image and caption..."):
                dev_data = reco_data(dev_embedded.embeddings, opened, config)
        print_skips(report)

        fusion, logs = train_reco(
            train_data,
            opened,
            dev_data,
            config,
            checkpoint_dir=checkpoint,
            on_epoch=show_epoch,
            show_progress=True,
        )
    fusion.save(out, dtype=torch.float16 if float16 else None)
    shutil.rmtree(checkpoint)  # the run is finished: nothing left to resume
    write_training_record(
        out,
        manifest=manifest,
        memory=memory,
        dev=dev,
        training_items_with_own_pair_excluded=own_excluded,
        config=config.to_dict(),
        history=[log.to_dict() for log in logs],
    )
    print_saved("RECO fusion", out, f"--memory DIR --fusion {out}")
