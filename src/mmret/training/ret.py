"""Training a ReT model on stored layer features (``mmret train ret``): seeded and resumable.

Each step samples ``batch_size`` captions and a retrieval task, reads only those rows' layer
features from the memory-mapped store, encodes the queries with ReT-Q and the documents with
ReT-D, and minimises symmetric InfoNCE on their MaxSim scores with in-batch negatives (pairs
that share an image are not each other's negatives). The tasks mix query and document
modalities so that one model serves them all:

* ``text>image``: a caption finds its image;
* ``image>text``: an image finds its caption;
* ``text>image+text``: a caption finds its image paired with another of that image's captions
  (the multimodal-document task of :mod:`mmret.evaluation.documents`).

After every epoch a checkpoint (:mod:`mmret.training.checkpoint`) is written, and with a dev
set the epoch of best dev RSUM is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812 - the universal torch idiom

from mmret._config import JsonConfig
from mmret.cache.layer_features import LayerFeatureSet
from mmret.cache.tower_features import PairFeatures
from mmret.encoders.base import Encoder
from mmret.errors import InputError
from mmret.evaluation.documents import (
    DocumentTaskReport,
    document_split,
    document_task_metrics,
)
from mmret.evaluation.retrieval import RetrievalReport, retrieval_metrics
from mmret.heads.alignment import AlignmentHead
from mmret.heads.ret import RetConfig, RetModel, RetTower
from mmret.late_interaction import maxsim_tensors
from mmret.training.crossfit import out_of_fold_embeddings
from mmret.training.loop import Judged, Run, fit, seeded
from mmret.training.losses import symmetric_info_nce_scores

TASKS = ("text>image", "image>text", "text>image+text")
#: Folds of ``mmret train ret --cross-fit`` when the backbone's alignment can be retrained.
CROSS_FIT = 5
_CHUNK = 256
_PCA_ROWS = 8192


@dataclass(frozen=True)
class RetTrainingConfig(JsonConfig):
    """Hyper-parameters of :func:`train_ret` (defaults chosen on Flickr8k dev).

    ``task_weights`` are the relative frequencies of :data:`TASKS` among the steps.
    """

    image_layers: tuple[int, ...] = (6, 7, 8)
    text_layers: tuple[int, ...] = (2, 4, 6)
    tokens: int = 16
    token_dim: int = 64
    width: int = 128
    heads: int = 4
    gates: bool = True
    shared: bool = False
    global_path: bool = True
    dropout: float = 0.0  # features are frozen and runs short: dropout only cost time
    task_weights: tuple[float, ...] = (2.0, 1.0, 1.0)
    # Small batches: on a CPU budget of minutes, more updates beat more in-batch negatives
    # (batches of 128 learnt far slower per sample on Flickr8k). A low rate: the global path
    # starts at the starter's score, and 1e-3 lost dev recall from there (model card).
    epochs: int = 4
    batch_size: int = 32
    learning_rate: float = 2e-4
    weight_decay: float = 0.05
    seed: int = 0
    # 0: training sees the global head's own vectors. K >= 2: each training image's and
    # caption's head vector comes from the head's alignment retrained on the K - 1 folds that
    # leave it out (:func:`cross_fitted_head_vectors`), as the real head meets new data.
    cross_fit: int = 0
    # Batches of images whose (cross-fitted) head vectors are near neighbours, so that the
    # in-batch negatives are the ones the head confuses (needs ``cross_fit``).
    hard_batches: bool = False

    def __post_init__(self) -> None:
        if len(self.task_weights) != len(TASKS) or min(self.task_weights) < 0:
            raise InputError(
                f"task weights must be {len(TASKS)} non-negative numbers, one per task "
                f"({', '.join(TASKS)}): got {list(self.task_weights)}"
            )
        if sum(self.task_weights) <= 0:
            raise InputError("at least one task needs a positive weight")
        if self.hard_batches and not self.cross_fit:
            raise InputError(
                "hard batches group images by their cross-fitted head vectors: they need "
                "--cross-fit"
            )


@dataclass(frozen=True)
class RetEpochLog:
    epoch: int
    loss: float
    dev: RetrievalReport | None
    documents: DocumentTaskReport | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "loss": self.loss,
            "dev": self.dev.to_dict() if self.dev else None,
            "documents": self.documents.to_dict() if self.documents else None,
        }


def build_model(
    train: LayerFeatureSet,
    config: RetTrainingConfig,
    backbone: str,
    layer_source: str,
    global_head: AlignmentHead | None = None,
) -> RetModel:
    """A fresh model; with ``global_head`` (the backbone's one-vector alignment head, which
    reads the towers' last layers) and ``config.global_path``, a frozen copy of it is the
    model's global path."""
    train.require(config.image_layers, config.text_layers)
    head = global_head if config.global_path else None
    if head is not None and (
        head.config.image_dim != train.image[config.image_layers[-1]].tokens.shape[1]
        or head.config.text_dim != train.text[config.text_layers[-1]].tokens.shape[1]
    ):
        raise InputError(
            "the global path's alignment head reads the towers' last layers: end "
            "--image-layers and --text-layers with them (-1), or use --no-global-path"
        )
    model = RetModel(
        RetConfig(
            backbone=backbone,
            image_layers=config.image_layers,
            text_layers=config.text_layers,
            image_dims=tuple(train.image[n].tokens.shape[1] for n in config.image_layers),
            text_dims=tuple(train.text[n].tokens.shape[1] for n in config.text_layers),
            tokens=config.tokens,
            token_dim=config.token_dim,
            width=config.width,
            heads=config.heads,
            gates=config.gates,
            shared=config.shared,
            global_path=config.global_path,
            global_head=None if head is None else head.config.to_dict(),
            dropout=config.dropout,
            layer_source=layer_source,
        )
    )
    if head is not None:
        for tower in {model.query, model.document}:
            assert tower.global_head is not None
            tower.global_head.load_state_dict(head.state_dict())
        # One projection for both sides to start with, so that the first scores are the
        # head's: onto the principal directions of the head's training vectors, which keep
        # far more of its scores than a random projection to token_dim does.
        directions = principal_directions(head, train, config)
        for tower in {model.query, model.document}:
            with torch.no_grad():
                tower.global_out.weight.copy_(directions)
    return model


def principal_directions(
    head: AlignmentHead, train: LayerFeatureSet, config: RetTrainingConfig
) -> torch.Tensor:
    """``(token_dim, E)`` the top principal directions (uncentred: scores are inner products)
    of the head's unit vectors of the stored images and captions, at most 8,192 of each."""
    images = np.arange(min(len(train.image_ids), _PCA_ROWS))
    captions = np.arange(min(len(train.text_image), _PCA_ROWS))
    image_layer, text_layer = config.image_layers[-1], config.text_layers[-1]
    with torch.inference_mode():
        image = head.image(train.image[image_layer].read_pooled(images))
        text = head.text(
            torch.nn.functional.normalize(train.text[text_layer].read_pooled(captions))
        )
        vectors = torch.cat([torch.nn.functional.normalize(v, dim=-1) for v in (image, text)])
        _, _, right = torch.linalg.svd(vectors, full_matrices=False)
    directions: torch.Tensor = right[: config.token_dim].clone()
    return directions


@dataclass(frozen=True)
class HeadVectors:
    """Unit global-head embeddings of a stored set's rows, ``image (N, E)`` and ``text (T, E)``,
    fed to the towers in place of their own head's (cross-fitted training)."""

    image: torch.Tensor
    text: torch.Tensor

    def of(self, image_rows: np.ndarray | None, text_rows: np.ndarray | None) -> torch.Tensor:
        """``(B, E)`` the vectors of images, captions or image+caption pairs, combined as
        :meth:`RetTower.forward` combines its head's (the normalised sum)."""
        parts = [
            vectors[torch.from_numpy(rows)]
            for vectors, rows in ((self.image, image_rows), (self.text, text_rows))
            if rows is not None
        ]
        return F.normalize(torch.stack(parts).sum(0), dim=-1)


def cross_fitted_head_vectors(
    encoder: Encoder,
    train: LayerFeatureSet,
    config: RetTrainingConfig,
    *,
    cache_dir: Path | None = None,
    show_progress: bool = False,
) -> HeadVectors:
    """Every training image's and caption's vector by ``encoder``'s alignment retrained with
    its own recipe on the ``config.cross_fit - 1`` folds that leave it out, from the stored
    last layers pooled as the global path pools them."""
    if not config.global_path:
        raise InputError(
            "cross-fitting replaces the global path's head vectors in training: it needs the "
            "global path (drop --no-global-path)"
        )
    images = np.arange(len(train.image_ids))
    captions = np.arange(len(train.text_image))
    features = PairFeatures(
        list(train.image_ids),
        train.image[config.image_layers[-1]].read_pooled(images).numpy(),
        F.normalize(train.text[config.text_layers[-1]].read_pooled(captions), dim=-1).numpy(),
        np.asarray(train.text_image),
    )
    image, text = out_of_fold_embeddings(
        encoder,
        features,
        config.cross_fit,
        config.seed,
        cache_dir=cache_dir,
        show_progress=show_progress,
    )
    return HeadVectors(torch.from_numpy(image), torch.from_numpy(text))


def neighbourhood_order(vectors: torch.Tensor, seeds: np.ndarray, batch: int) -> np.ndarray:
    """A permutation of the rows of ``(N, E)`` ``vectors`` in which each run of ``batch`` is a
    seed (the first unused row of ``seeds``, a random permutation) and its nearest unused rows."""
    unused = torch.ones(len(vectors), dtype=torch.bool)
    order: list[np.ndarray] = []
    for seed in seeds.tolist():
        if not unused[seed]:
            continue
        scores = torch.where(unused, vectors @ vectors[seed], -torch.inf)
        nearest = scores.topk(min(batch, int(unused.sum()))).indices
        unused[nearest] = False
        order.append(nearest.numpy())
    return np.concatenate(order)


def encode_rows(
    tower: RetTower,
    features: LayerFeatureSet,
    image_rows: np.ndarray | None,
    text_rows: np.ndarray | None,
    head_vectors: HeadVectors | None = None,
) -> torch.Tensor:
    """``(B, T, token_dim)`` tokens of stored images, captions, or image+caption pairs (both
    row arrays given, of one length); ``head_vectors`` replace the tower's own head's."""
    config = tower.config
    image = None if image_rows is None else features.image_features(image_rows, config.image_layers)
    text = None if text_rows is None else features.text_features(text_rows, config.text_layers)
    vectors = None if head_vectors is None else head_vectors.of(image_rows, text_rows)
    tokens: torch.Tensor = tower(image, text, head_vectors=vectors)
    return tokens


def embed_stored(
    tower: RetTower,
    features: LayerFeatureSet,
    image_rows: np.ndarray | None,
    text_rows: np.ndarray | None,
) -> np.ndarray:
    """``(B, T * token_dim)`` flattened token sets, chunk by chunk, in inference mode."""
    count = len(image_rows if image_rows is not None else text_rows)  # type: ignore[arg-type]
    chunks = []
    tower.eval()
    with torch.inference_mode():
        for start in range(0, count, _CHUNK):
            part = slice(start, start + _CHUNK)
            tokens = encode_rows(
                tower,
                features,
                None if image_rows is None else image_rows[part],
                None if text_rows is None else text_rows[part],
            )
            chunks.append(tokens.flatten(1).numpy())
    return np.concatenate(chunks)


def evaluate_stored(
    model: RetModel,
    dev: LayerFeatureSet,
    *,
    full: bool = True,
    forms: tuple[str, ...] = ("image+text",),
) -> tuple[RetrievalReport, DocumentTaskReport | None]:
    """Retrieval both ways and (``full``) the multimodal-document task in ``forms``, on a
    stored set. Not ``full``: retrieval against each image's first caption only, a fifth of
    the MaxSim work, which is what picks the epoch during training."""
    images = np.arange(len(dev.image_ids))
    owner = np.asarray(dev.text_image)
    captions = np.arange(len(owner)) if full else document_split(owner)[0]
    token_dim = model.config.token_dim
    text_queries = embed_stored(model.query, dev, None, captions)
    retrieval = retrieval_metrics(
        embed_stored(model.document, dev, images, None),
        embed_stored(model.document, dev, None, captions),
        owner[captions],
        token_dim=token_dim,
        image_queries=embed_stored(model.query, dev, images, None),
        text_queries=text_queries,
    )
    if not full:
        return retrieval, None
    documents = document_task_metrics(
        lambda image_rows, text_rows: embed_stored(model.document, dev, image_rows, text_rows),
        text_queries,
        owner,
        token_dim,
        forms,
    )
    return retrieval, documents


class _Batches:
    """Which rows a step reads: its images, one caption of each, and another caption of it."""

    def __init__(self, text_image: np.ndarray) -> None:
        self.owner = np.asarray(text_image, dtype=np.int64)
        self.by_image = np.argsort(self.owner, kind="stable")  # caption rows grouped by image
        self.counts = np.bincount(self.owner, minlength=int(self.owner.max(initial=-1)) + 1)
        self.starts = np.cumsum(self.counts) - self.counts

    @property
    def images(self) -> int:
        return len(self.counts)

    def pick(self, images: np.ndarray, draw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(B,)`` a caption of each image and ``(B,)`` another of its captions (the same one
        when it has only one), chosen by ``(B, 2)`` uniform ``draw``."""
        counts = self.counts[images]
        first = np.minimum((draw[:, 0] * counts).astype(np.int64), counts - 1)
        # The partner skips over the first pick's position among the image's captions.
        other = np.minimum((draw[:, 1] * (counts - 1)).astype(np.int64), np.maximum(counts - 2, 0))
        other = np.where(counts > 1, other + (other >= first), first)
        starts = self.starts[images]
        return self.by_image[starts + first], self.by_image[starts + other]


def task_loss(
    model: RetModel,
    train: LayerFeatureSet,
    task: str,
    captions: np.ndarray,
    images: np.ndarray,
    partners: np.ndarray,
    head_vectors: HeadVectors | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE on the mean-over-query-tokens MaxSim of one task's batch."""
    query_rows, document_rows = {
        "text>image": ((None, captions), (images, None)),
        "image>text": ((images, None), (None, captions)),
        "text>image+text": ((None, captions), (images, partners)),
    }[task]
    queries = encode_rows(model.query, train, *query_rows, head_vectors)
    documents = encode_rows(model.document, train, *document_rows, head_vectors)
    # MaxSim sums over query tokens; dividing by their count keeps the logits' scale
    # independent of T, so one temperature fits every T.
    scores = maxsim_tensors(queries, documents) / queries.shape[1]
    return symmetric_info_nce_scores(model.logit_scale * scores, torch.from_numpy(images))


def train_ret(
    train: LayerFeatureSet,
    dev: LayerFeatureSet | None,
    config: RetTrainingConfig,
    *,
    backbone: str,
    layer_source: str,
    checkpoint_dir: Path | None = None,
    on_epoch: Callable[[RetEpochLog], None] | None = None,
    show_progress: bool = False,
    global_head: AlignmentHead | None = None,
    head_vectors: HeadVectors | None = None,
) -> tuple[RetModel, list[dict[str, Any]]]:
    """Train ReT-Q and ReT-D; with ``dev``, keep the epoch of best dev RSUM (else the last),
    measured against each dev image's first caption (see :func:`evaluate_stored`).

    ``head_vectors`` (with ``global_head``): the training rows' global-head vectors to train
    on in place of ``global_head``'s own (:func:`cross_fitted_head_vectors`); dev and the
    saved model use ``global_head``.

    Returns the model and every epoch's :meth:`RetEpochLog.to_dict`, resumed epochs included.
    With ``checkpoint_dir``, a later call with the same arguments resumes after the last
    finished epoch and ends with the same model as an uninterrupted run.
    """
    if config.cross_fit and head_vectors is None:
        raise InputError(
            "a cross-fitted config trains on cross-fitted head vectors: pass "
            "head_vectors=cross_fitted_head_vectors(...)"
        )
    if head_vectors is not None and (global_head is None or not config.global_path):
        raise InputError(
            "cross-fitting replaces the global path's head vectors in training: it needs the "
            "global path and the backbone's alignment head"
        )
    generator = seeded(config)
    model = build_model(train, config, backbone, layer_source, global_head)
    optimiser = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
    )
    batches = _Batches(train.text_image)
    # An epoch shows every image once, with one of its captions: captions are five
    # paraphrases of one picture, and a pass over images costs a fifth of one over captions.
    steps = max(1, batches.images // config.batch_size)
    weights = torch.tensor(config.task_weights, dtype=torch.float64)

    def losses(epoch: int) -> Iterator[torch.Tensor]:
        order = torch.randperm(batches.images, generator=generator).numpy()
        if config.hard_batches:
            assert head_vectors is not None  # hard batches need cross_fit: checked above
            order = neighbourhood_order(head_vectors.image, order, config.batch_size)
        tasks = torch.multinomial(weights, steps, replacement=True, generator=generator).numpy()
        draws = torch.rand(batches.images, 2, generator=generator, dtype=torch.float64).numpy()
        for step in range(steps):
            images = order[step * config.batch_size : (step + 1) * config.batch_size]
            captions, partners = batches.pick(images, draws[images])
            yield task_loss(
                model, train, TASKS[tasks[step]], captions, images, partners, head_vectors
            )

    def judge(epoch: int, loss: float) -> Judged[RetEpochLog]:
        retrieval = documents = None
        if dev is not None:
            retrieval, documents = evaluate_stored(model, dev, full=False)
        log = RetEpochLog(epoch, loss, retrieval, documents)
        return Judged.by_rsum(log, log.to_dict(), retrieval)

    run = Run(model, optimiser, generator, config, losses, judge, steps, "ReT epoch {epoch}")
    return model, fit(
        run, checkpoint_dir=checkpoint_dir, on_epoch=on_epoch, show_progress=show_progress
    )
