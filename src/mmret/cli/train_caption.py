"""``mmret train caption``: the retrieval-augmented caption decoder (RA-CM3)."""

from __future__ import annotations

from pathlib import Path

import typer

from mmret.cache.embeddings import embed_images
from mmret.cli.output import console, friendly_errors, print_saved, print_skips
from mmret.encoders import DEFAULT_MODEL, Encoder, load_encoder
from mmret.engine import Retriever
from mmret.errors import InputError
from mmret.generation.policy import ContextPolicy
from mmret.generation.vocabulary import Vocabulary
from mmret.ingest.pairs import read_pairs
from mmret.ingest.report import SkipReport
from mmret.training.captioner import (
    CaptionedImages,
    CaptionTrainingConfig,
    MemoryDocuments,
    captioned_images,
    train_captioner,
)
from mmret.training.record import write_training_record

DEFAULTS = CaptionTrainingConfig()


def embedded_images(
    manifest: Path, encoder: Encoder, report: SkipReport, cache_dir: Path | None
) -> CaptionedImages:
    """A manifest's captioned images with their embeddings (cached like evaluation's)."""
    pairs = read_pairs(manifest, report)
    vectors, decoded = embed_images(
        encoder, pairs.images, cache_dir=cache_dir, report=report, show_progress=True
    )
    return captioned_images(pairs, vectors, decoded)


def show_epoch(log: dict[str, object]) -> None:
    line = f"epoch {log['epoch']:3d}  loss {log['loss']:.4f}"
    dev = log.get("dev")
    if isinstance(dev, dict):
        line += f"  dev BLEU-4 {dev['BLEU-4']:.1f}  CIDEr {dev['CIDEr']:.1f}"
    console.print(line, highlight=False)


@friendly_errors
def train(
    manifest: Path = typer.Argument(
        ..., help="JSONL/CSV/Parquet manifest of images with captions (the training images)."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Folder for the model (and its per-epoch checkpoint)."
    ),
    memory: Path | None = typer.Option(
        None,
        "--memory",
        help="An index of captioned images to retrieve from (it may hold the training images: "
        "an image never reads itself). Its model embeds the images.",
    ),
    dev: Path | None = typer.Option(
        None, help="Dev manifest: caption it each epoch (CIDEr) and keep the best epoch."
    ),
    documents: int = typer.Option(
        DEFAULTS.documents, min=0, help="Documents read per caption (0: no retrieval)."
    ),
    sample_from: int = typer.Option(
        DEFAULTS.sample_from, min=1, help="Training draws the documents from the top SAMPLE_FROM."
    ),
    alpha: float = typer.Option(
        DEFAULTS.alpha, min=0.0, help="Weight of the loss on the documents' words (RA-CM3)."
    ),
    epochs: int = typer.Option(DEFAULTS.epochs, min=1),
    min_count: int = typer.Option(
        DEFAULTS.min_count, min=1, help="Words seen fewer times in the captions read as unknown."
    ),
    width: int = typer.Option(DEFAULTS.width, min=8, help="Transformer width."),
    layers: int = typer.Option(DEFAULTS.layers, min=1, help="Transformer layers."),
    batch_size: int = typer.Option(DEFAULTS.batch_size, min=2),
    learning_rate: float = typer.Option(DEFAULTS.learning_rate, min=0.0),
    diversity: float = typer.Option(
        0.0, min=0.0, max=1.0, help="The saved retrieval policy's diversity (used by caption)."
    ),
    model: str = typer.Option(
        DEFAULT_MODEL, "--model", help="Embedding model without a memory (else the memory's)."
    ),
    seed: int = typer.Option(DEFAULTS.seed),
    cache_dir: Path | None = typer.Option(None, help="Embedding cache (default ~/.cache/mmret)."),
) -> None:
    """Train a caption decoder that reads the image and documents retrieved for it.

    Resumable: the same command run again continues after the last finished epoch.
    """
    if documents and memory is None:
        raise InputError("--memory is needed unless --documents 0 (the decoder without retrieval)")
    config = CaptionTrainingConfig(
        documents=documents,
        sample_from=max(sample_from, documents),
        alpha=alpha,
        epochs=epochs,
        min_count=min_count,
        width=width,
        layers=layers,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
    )
    report = SkipReport()
    retriever = Retriever.open(memory, readonly=True) if memory is not None else None
    try:
        encoder = retriever.encoder if retriever is not None else load_encoder(model)
        spec = retriever.manifest.encoder if retriever is not None else model
        train_set = embedded_images(manifest, encoder, report, cache_dir)
        dev_set = embedded_images(dev, encoder, report, cache_dir) if dev else None
        vocabulary = Vocabulary.build(
            (c for captions in train_set.captions for c in captions), config.min_count
        )
        documents_set = (
            MemoryDocuments.read(retriever, vocabulary, config.max_words)
            if retriever is not None and documents
            else None
        )
    finally:
        if retriever is not None:
            retriever.close()
    print_skips(report)
    console.print(f"{len(train_set.ids)} training images, {len(vocabulary)} words", highlight=False)
    decoder, history = train_captioner(
        train_set,
        documents_set,
        dev_set,
        vocabulary,
        config,
        encoder=spec,
        checkpoint_dir=out / "checkpoint",
        on_epoch=show_epoch,
        show_progress=True,
    )
    policy = ContextPolicy(
        k=max(documents, 1),
        candidates=max(50, documents),
        modality="prefer",
        diversity=diversity,
        duplicate_threshold=config.duplicate_threshold,
    )
    decoder.save(out, {"vocabulary": vocabulary.to_dict(), "policy": policy.to_dict()})
    write_training_record(
        out, manifest=manifest, memory=memory, dev=dev, config=config.to_dict(), history=history
    )
    print_saved("caption decoder", out, f"mmret caption IMAGE --model {out}")
