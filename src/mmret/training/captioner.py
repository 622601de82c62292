"""Training the retrieval-augmented caption decoder (``mmret train caption``): seeded, resumable.

Each training image is a query. Its documents come from the memory (an mmret index of captioned
images, e.g. the training set itself) by embedding similarity, never the image itself: an item
with the same id or image file, or one at least ``duplicate_threshold`` similar to it, is left
out, so the decoder cannot learn to copy its own references. As RA-CM3 does, the ``documents``
read in a step are drawn at random from the top ``sample_from`` (kept in rank order), each
document shows one of its caption lines at random, and each loses its embedding or its caption
with a small probability, so that the decoder learns to read image-only and text-only documents
too. The loss is RA-CM3's: cross-entropy on the caption's words plus ``alpha`` times that on the
documents' words.

An epoch shows every image once with one of its captions. After each, the dev images are
captioned from the same memory (the top ``documents`` by relevance) and scored with CIDEr; the
epoch of best dev CIDEr is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812 - the universal torch idiom

from mmret._config import JsonConfig
from mmret.engine import Retriever
from mmret.errors import InputError
from mmret.evaluation.captioning import caption_metrics
from mmret.generation.captioner import Sample, assemble, generate
from mmret.generation.vocabulary import BOS, Vocabulary
from mmret.heads.captioner import (
    CAPTION,
    DOC_TEXT,
    CaptionDecoder,
    CaptionDecoderConfig,
    DecoderInput,
)
from mmret.ingest.pairs import PairSet
from mmret.training.loop import Judged, Run, fit, seeded

_DEV_BATCH = 100
_BLOCK = 1024


@dataclass(frozen=True)
class CaptionTrainingConfig(JsonConfig):
    """Hyper-parameters of :func:`train_captioner` (defaults chosen on Flickr8k dev);
    ``documents=0`` trains the same decoder without retrieval."""

    documents: int = 5
    sample_from: int = 10
    alpha: float = 0.0
    drop_vector: float = 0.15
    drop_text: float = 0.15
    duplicate_threshold: float = 0.95
    prefix: int = 4
    width: int = 256
    layers: int = 3
    heads: int = 4
    ff_dim: int = 1024
    dropout: float = 0.1
    max_words: int = 20
    min_count: int = 5
    epochs: int = 6
    batch_size: int = 64
    learning_rate: float = 5e-4
    weight_decay: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if self.documents and self.sample_from < self.documents:
            raise InputError(
                f"sample_from ({self.sample_from}) must be at least documents ({self.documents})"
            )
        if self.drop_vector + self.drop_text >= 1.0:
            raise InputError("drop_vector + drop_text must stay below 1")


@dataclass(frozen=True)
class CaptionedImages:
    """Images with their ``(N, D)`` embeddings and reference captions (the training queries
    or the dev set)."""

    ids: list[str]
    images: list[str]
    vectors: np.ndarray
    captions: list[list[str]]


@dataclass(frozen=True)
class MemoryDocuments:
    """Every document of a memory index: id, image path, ``(M, D)`` stored vectors, and the
    caption lines of its text as word ids."""

    ids: list[str]
    images: list[str | None]
    vectors: np.ndarray
    lines: list[list[list[int]]]

    @classmethod
    def read(cls, memory: Retriever, vocabulary: Vocabulary, max_words: int) -> MemoryDocuments:
        ids = memory.ids()
        rows = memory.get(ids)
        vectors = memory.stored_vectors(ids)
        lines = [
            [vocabulary.encode(x, max_words) for x in (rows[i].text or "").split("\n") if x.strip()]
            for i in ids
        ]
        images = [rows[i].image for i in ids]
        return cls(ids, images, np.stack([vectors[i] for i in ids]), lines)


def neighbours(
    queries: CaptionedImages, memory: MemoryDocuments, count: int, duplicate_threshold: float
) -> np.ndarray:
    """``(N, count)`` rows of ``memory``, most similar first, for each query (-1 where fewer
    qualify): never the query's own item (same id or image file), a near-duplicate of it, or
    a document without a caption."""
    own_image = {str(Path(p).resolve()): i for i, p in enumerate(queries.images)}
    own_id = {id_: i for i, id_ in enumerate(queries.ids)}
    own: list[tuple[int, int]] = []  # (query, memory row) pairs that are the same item
    for row, (id_, image) in enumerate(zip(memory.ids, memory.images, strict=True)):
        owners = {own_id.get(id_), own_image.get(str(Path(image).resolve())) if image else None}
        own += [(query, row) for query in owners if query is not None]
    mine = np.array(own, dtype=np.int64).reshape(-1, 2)
    has_text = np.array([bool(lines) for lines in memory.lines])
    out = np.full((len(queries.ids), count), -1, dtype=np.int64)
    for start in range(0, len(queries.ids), _BLOCK):
        block = queries.vectors[start : start + _BLOCK] @ memory.vectors.T
        block[block >= duplicate_threshold] = -np.inf
        block[:, ~has_text] = -np.inf
        inside = mine[(mine[:, 0] >= start) & (mine[:, 0] < start + len(block))]
        block[inside[:, 0] - start, inside[:, 1]] = -np.inf
        top = np.argsort(-block, axis=1)[:, :count]
        valid = np.take_along_axis(block, top, axis=1) > -np.inf
        out[start : start + len(block), : top.shape[1]] = np.where(valid, top, -1)
    return out


def caption_loss(model: CaptionDecoder, batch: DecoderInput, alpha: float) -> torch.Tensor:
    """RA-CM3's loss: mean cross-entropy of the caption's words (and ``<eos>``) plus ``alpha``
    times that of the documents' words."""
    hidden = model(batch)[:, :-1]
    targets = batch.tokens[:, 1:]
    kinds = batch.kinds[:, 1:]
    caption = (kinds == CAPTION) & (targets != BOS)
    loss = F.cross_entropy(model.logits(hidden[caption]), targets[caption])
    documents = kinds == DOC_TEXT
    if alpha > 0 and documents.any():
        loss = loss + alpha * F.cross_entropy(model.logits(hidden[documents]), targets[documents])
    return loss


class _Samples:
    """Draws the training sequences of an epoch."""

    def __init__(
        self,
        train: CaptionedImages,
        memory: MemoryDocuments | None,
        vocabulary: Vocabulary,
        config: CaptionTrainingConfig,
    ) -> None:
        self.train, self.memory, self.config = train, memory, config
        self.captions = [
            [vocabulary.encode(c, config.max_words) for c in captions]
            for captions in train.captions
        ]
        self.near = (
            neighbours(train, memory, config.sample_from, config.duplicate_threshold)
            if memory is not None and config.documents
            else np.zeros((len(train.ids), 0), dtype=np.int64)
        )

    def draw(self, image: int, rng: np.random.Generator) -> Sample:
        config = self.config
        caption = self.captions[image][rng.integers(len(self.captions[image]))]
        documents: list[tuple[np.ndarray | None, list[int] | None]] = []
        pool = self.near[image][self.near[image] >= 0]
        if self.memory is not None and len(pool):
            picked = np.sort(rng.choice(len(pool), min(config.documents, len(pool)), replace=False))
            for row in pool[picked]:
                lines = self.memory.lines[row]
                words: list[int] | None = lines[rng.integers(len(lines))]
                vector: np.ndarray | None = self.memory.vectors[row]
                draw = rng.random()
                if draw < config.drop_vector:
                    vector = None
                elif draw < config.drop_vector + config.drop_text:
                    words = None
                documents.append((vector, words))
        return Sample(self.train.vectors[image], documents, caption)


def dev_samples(
    dev: CaptionedImages, memory: MemoryDocuments | None, documents: int, threshold: float
) -> list[Sample]:
    """The dev images with their top ``documents`` by relevance, each read whole (embedding and
    first caption line): what captioning from an index does with relevance only."""
    if memory is None or not documents:
        return [Sample(vector, ()) for vector in dev.vectors]
    near = neighbours(dev, memory, documents, threshold)
    return [
        Sample(
            vector,
            [(memory.vectors[r], memory.lines[r][0]) for r in rows if r >= 0],
        )
        for vector, rows in zip(dev.vectors, near, strict=True)
    ]


def dev_scores(
    model: CaptionDecoder, vocabulary: Vocabulary, dev: CaptionedImages, samples: Sequence[Sample]
) -> dict[str, float]:
    """BLEU-4 and CIDEr of greedy captions for ``samples`` (one per dev image)."""
    model.eval()
    made: list[str] = []
    for start in range(0, len(samples), _DEV_BATCH):
        made += [
            vocabulary.decode(ids) for ids in generate(model, samples[start : start + _DEV_BATCH])
        ]
    references = dict(zip(dev.ids, dev.captions, strict=True))
    scores = caption_metrics(references, dict(zip(dev.ids, made, strict=True)), meteor=False)
    return {"BLEU-4": scores["BLEU-4"], "CIDEr": scores["CIDEr"]}


def train_captioner(
    train: CaptionedImages,
    memory: MemoryDocuments | None,
    dev: CaptionedImages | None,
    vocabulary: Vocabulary,
    config: CaptionTrainingConfig,
    *,
    encoder: str,
    checkpoint_dir: Path | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    show_progress: bool = False,
) -> tuple[CaptionDecoder, list[dict[str, Any]]]:
    """Train the decoder; with ``dev``, keep the epoch of best dev CIDEr (else the last).

    Returns the model and every epoch's log, resumed epochs included. With
    ``checkpoint_dir``, a later call with the same arguments resumes after the last finished
    epoch and ends with the same model as an uninterrupted run.
    """
    if config.documents and memory is None:
        raise InputError("a decoder with retrieval (documents > 0) trains with a memory")
    generator = seeded(config)
    model = CaptionDecoder(
        CaptionDecoderConfig(
            encoder=encoder,
            vector_dim=train.vectors.shape[1],
            vocab_size=len(vocabulary),
            documents=config.documents,
            prefix=config.prefix,
            width=config.width,
            layers=config.layers,
            heads=config.heads,
            ff_dim=config.ff_dim,
            dropout=config.dropout,
            max_words=config.max_words,
        )
    )
    optimiser = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    samples = _Samples(train, memory, vocabulary, config)
    held_out = dev_samples(dev, memory, config.documents, config.duplicate_threshold) if dev else []
    steps = max(1, len(train.ids) // config.batch_size)

    def losses(epoch: int) -> Iterator[torch.Tensor]:
        seed = int(torch.randint(2**31, (1,), generator=generator))
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(train.ids))
        for step in range(steps):
            rows = order[step * config.batch_size : (step + 1) * config.batch_size]
            batch = assemble(
                [samples.draw(int(i), rng) for i in rows], config.prefix, left_pad=False
            )
            yield caption_loss(model, batch, config.alpha)

    def judge(epoch: int, loss: float) -> Judged[dict[str, Any]]:
        log: dict[str, Any] = {"epoch": epoch, "loss": loss}
        if dev is None:
            return Judged(log, log, None)
        log["dev"] = dev_scores(model, vocabulary, dev, held_out)
        return Judged(log, log, log["dev"]["CIDEr"])

    run = Run(
        model, optimiser, generator, config, losses, judge, steps, "Decoder epoch {epoch}", clip=1.0
    )
    return model, fit(
        run, checkpoint_dir=checkpoint_dir, on_epoch=on_epoch, show_progress=show_progress
    )


def captioned_images(pairs: PairSet, vectors: np.ndarray, decoded: np.ndarray) -> CaptionedImages:
    """The images of ``pairs`` that decoded (``decoded (N,)``), with their ``(N, D)``
    embeddings and captions."""
    captions: list[list[str]] = [[] for _ in pairs.images]
    for text, owner in zip(pairs.texts, pairs.text_image.tolist(), strict=True):
        captions[owner].append(text)
    keep = np.flatnonzero(decoded)
    return CaptionedImages(
        [pairs.image_ids[i] for i in keep],
        [str(pairs.images[i]) for i in keep],
        np.asarray(vectors[keep], dtype=np.float32),
        [captions[i] for i in keep],
    )
