"""Training the RECO fusion on frozen, cached embeddings (``mmret train reco``).

The encoder stays frozen: training images and captions are embedded once (cached), their
memory neighbours are searched once (the memory never returns a training item's own pair nor
its near-duplicates), and only the fusion learns, with RECO's loss
``NCE(refined V, refined T) + NCE(refined V, T) + NCE(V, refined T)``. Every epoch writes a
checkpoint (weights, optimiser, random states, best dev state) that a later run with the same
config resumes from (:func:`mmret.training.loop.fit`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from mmret._config import JsonConfig
from mmret.cache.embeddings import PairEmbeddings
from mmret.errors import InputError
from mmret.evaluation.retrieval import retrieval_metrics
from mmret.heads.reco import FusionConfig, TransformerFusion
from mmret.memory.store import Memory
from mmret.training.loop import EpochLog, Judged, Run, fit, seeded
from mmret.training.losses import symmetric_info_nce

CHECKPOINT = "checkpoint"


@dataclass(frozen=True)
class RecoTrainingConfig(JsonConfig):
    """Hyper-parameters of :func:`train_reco`: the shipped fusion's recipe (see its card)."""

    k: int = 10
    search: Literal["uni", "cross"] = "uni"
    threshold: float = 0.95
    heads: int = 8
    ff_dim: int = 512
    dropout: float = 0.1
    epochs: int = 3
    batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    seed: int = 0
    #: Train on ``cross_fit`` cross-fitted folds (:mod:`mmret.training.crossfit`); 0: on the
    #: frozen model's own embeddings of the training pairs.
    cross_fit: int = 0


@dataclass(frozen=True)
class RecoData:
    """Embeddings with their memory neighbours: ``image (N, D)``, ``text (T, D)``,
    ``text_image (T,)``, and for each image / text the ``(N, k)`` / ``(T, k)`` memory rows
    whose partners refine it (-1: none)."""

    image: np.ndarray
    text: np.ndarray
    text_image: np.ndarray
    image_neighbours: np.ndarray
    text_neighbours: np.ndarray


def reco_data(
    embeddings: PairEmbeddings,
    memory: Memory,
    config: RecoTrainingConfig,
    *,
    own_rows: np.ndarray | None = None,
) -> RecoData:
    """Search the memory for every image and caption of ``embeddings``.

    ``own_rows (N,)``: each image's own pair in the memory (-1: none), excluded from the
    neighbours of the image and of its captions (when the memory is the training set).
    """
    options = {"search": config.search, "threshold": config.threshold}
    image_found = memory.neighbours(
        embeddings.image,
        "image",
        config.k,
        exclude=own_rows,
        **options,  # type: ignore[arg-type]
    )
    text_exclude = None if own_rows is None else own_rows[embeddings.text_image]
    text_found = memory.neighbours(
        embeddings.text,
        "text",
        config.k,
        exclude=text_exclude,
        **options,  # type: ignore[arg-type]
    )
    return RecoData(
        np.asarray(embeddings.image, dtype=np.float32),
        np.asarray(embeddings.text, dtype=np.float32),
        np.asarray(embeddings.text_image, dtype=np.int64),
        image_found.rows,
        text_found.rows,
    )


@dataclass(frozen=True)
class RecoFold:
    """Training data whose neighbour rows index ``memory`` (a cross-fitting fold's own memory,
    see :mod:`mmret.training.crossfit`)."""

    data: RecoData
    memory: Memory


class _Partners:
    """The memory's vectors as tensors, and gathering ``(B, k)`` rows into ``(B, k, D)``."""

    def __init__(self, memory: Memory) -> None:
        self.vectors = {
            modality: torch.from_numpy(np.array(memory.vectors[modality], dtype=np.float32))
            for modality in ("image", "text")
        }

    def gather(self, rows: torch.Tensor, modality: str) -> tuple[torch.Tensor, torch.Tensor]:
        valid = rows >= 0
        return self.vectors[modality][rows.clamp_min(0)] * valid.unsqueeze(-1), valid


def refine_all(
    fusion: TransformerFusion, data: RecoData, partners: _Partners
) -> tuple[np.ndarray, np.ndarray]:
    """Refined unit ``(N, D)`` images and ``(T, D)`` texts of ``data``."""
    fusion.eval()
    out = []
    with torch.inference_mode():
        for vectors, rows, modality, partner in (
            (data.image, data.image_neighbours, "image", "text"),
            (data.text, data.text_neighbours, "text", "image"),
        ):
            parts = []
            for start in range(0, len(vectors), 2048):
                gathered, valid = partners.gather(
                    torch.from_numpy(rows[start : start + 2048]), partner
                )
                query = torch.from_numpy(vectors[start : start + 2048])
                parts.append(fusion.fuse(query, gathered, valid, modality).numpy())
            out.append(np.concatenate(parts))
    return out[0], out[1]


def train_reco(
    train: RecoData | Sequence[RecoFold],
    memory: Memory,
    dev: RecoData | None = None,
    config: RecoTrainingConfig | None = None,
    *,
    checkpoint_dir: Path | None = None,
    on_epoch: Callable[[EpochLog], None] | None = None,
    show_progress: bool = False,
) -> tuple[TransformerFusion, list[EpochLog]]:
    """Train a fusion with RECO's three-term loss; with ``dev``, keep the epoch of best RSUM
    (refined images against refined captions). Seeded: the same inputs give the same fusion,
    resumed or not.

    ``train`` is data whose neighbours index ``memory`` (the memory the fusion is for, which
    ``dev`` searches too), or cross-fitted folds, each with its own memory: a batch then holds
    one fold's pairs, since folds embed with different models.
    """
    config = config or RecoTrainingConfig()
    generator = seeded(config)
    folds = [
        _FoldTensors(f)
        for f in ([RecoFold(train, memory)] if isinstance(train, RecoData) else train)
    ]
    if not folds:
        raise InputError("no training data: give RecoData or at least one RecoFold")
    fusion = TransformerFusion(
        FusionConfig(
            dim=folds[0].image.shape[1],
            heads=config.heads,
            ff_dim=config.ff_dim,
            dropout=config.dropout,
            encoder=memory.manifest.encoder,
        )
    )
    optimiser = torch.optim.AdamW(
        fusion.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    steps_per_epoch = sum(fold.steps(config.batch_size) for fold in folds)
    dev_partners = folds[0].partners if isinstance(train, RecoData) else _Partners(memory)

    def losses(epoch: int) -> Iterator[torch.Tensor]:
        batches = [
            (fold, batch) for fold in folds for batch in fold.batches(config.batch_size, generator)
        ]
        if len(folds) > 1:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator)]
        for fold, (images, captions) in batches:
            plain_v, plain_t = fold.image[images], fold.text[captions]
            texts_of_v, valid_v = fold.partners.gather(fold.image_rows[images], "text")
            images_of_t, valid_t = fold.partners.gather(fold.text_rows[captions], "image")
            refined_v = fusion.fuse(plain_v, texts_of_v, valid_v, "image")
            refined_t = fusion.fuse(plain_t, images_of_t, valid_t, "text")
            scale = fusion.logit_scale
            yield (
                symmetric_info_nce(refined_v, refined_t, images, scale)
                + symmetric_info_nce(refined_v, plain_t, images, scale)
                + symmetric_info_nce(plain_v, refined_t, images, scale)
            )

    def judge(epoch: int, loss: float) -> Judged[EpochLog]:
        metrics = None
        if dev is not None:
            metrics = retrieval_metrics(*refine_all(fusion, dev, dev_partners), dev.text_image)
        log = EpochLog(epoch, loss, metrics)
        return Judged.by_rsum(log, log.to_dict(), metrics)

    label = f"Epoch {{epoch}}/{config.epochs}"
    run = Run(
        fusion,
        optimiser,
        generator,
        config,
        losses,
        judge,
        steps_per_epoch,
        label,
        schedule="one-cycle",
    )
    records = fit(
        run, checkpoint_dir=checkpoint_dir, on_epoch=on_epoch, show_progress=show_progress
    )
    return fusion, [EpochLog.from_dict(record) for record in records]


class _FoldTensors:
    """One fold's training data as tensors, and its epoch's batches of pairs.

    An epoch shows every image once, with one of its captions drawn at random: RECO trains on
    image-text pairs, and a batch then never holds two captions of one image.
    """

    def __init__(self, fold: RecoFold) -> None:
        self.partners = _Partners(fold.memory)
        self.image = torch.from_numpy(fold.data.image)
        self.text = torch.from_numpy(fold.data.text)
        self.image_rows = torch.from_numpy(fold.data.image_neighbours)
        self.text_rows = torch.from_numpy(fold.data.text_neighbours)
        owner = torch.from_numpy(fold.data.text_image)
        self.by_image = torch.argsort(owner, stable=True)
        self.counts = torch.bincount(owner, minlength=len(self.image))
        self.starts = torch.cumsum(self.counts, 0) - self.counts

    def steps(self, batch_size: int) -> int:
        return max(1, len(self.image) // batch_size)

    def batches(
        self, batch_size: int, generator: torch.Generator
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(images, one caption of each)`` row batches covering the fold once."""
        order = torch.randperm(len(self.image), generator=generator)
        draw = torch.rand(len(self.image), generator=generator)
        caption = self.by_image[
            self.starts + (draw * self.counts).long().clamp(max=self.counts - 1)
        ]
        return [
            (images, caption[images])
            for images in (
                order[step * batch_size : (step + 1) * batch_size]
                for step in range(self.steps(batch_size))
            )
        ]
