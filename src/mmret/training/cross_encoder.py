"""Joint training of the bi-encoder and the cross-encoder (``mmret train rerank``).

The first ``warmup_epochs`` train the bi-encoder alone (symmetric InfoNCE over every caption),
so that there is a first stage to mine negatives with. Each later epoch first **mines hard
negatives** with the current bi-encoder: for a sample of captions, the images it ranks highest
that are not theirs; for a sample of images, the captions of other images it ranks highest.
Then each step trains both ways of using the model at once: InfoNCE on a batch of pairs for
the bi-encoder, plus a listwise cross-entropy for the cross-encoder over each query's true
match and ``negatives`` drawn from its mined top ``mine_top`` (half the queries captions, half
images). In the joint model the two share the token projections, so both losses shape them;
with ``joint=False`` they share nothing (two separately trained models, the ablation).

After each epoch the dev set is scored after reranking the bi-encoder's top ``rerank_n`` for a
fixed sample of queries; the epoch with the best sum of those recalls is kept. Checkpoints
(:mod:`mmret.training.checkpoint`) make a run resumable; it is seeded.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812 - the universal torch idiom

from mmret._config import JsonConfig
from mmret.cache.layer_features import LayerFeatureSet
from mmret.evaluation.reranked import (
    RerankedReport,
    repeat_side,
    reranked_retrieval,
)
from mmret.evaluation.retrieval import RetrievalReport, retrieval_metrics
from mmret.heads.cross_encoder import CrossEncoder, RerankConfig, SideTokens
from mmret.training.calibration import calibrate_cosine_weight
from mmret.training.cross_encoder_data import CHUNK, RerankData
from mmret.training.hat import set_statistics
from mmret.training.loop import Judged, Run, fit, seeded
from mmret.training.losses import symmetric_info_nce
from mmret.training.record import TRAINING_RECORD

_SCALE_RATE = 10.0


@dataclass(frozen=True)
class RerankTrainingConfig(JsonConfig):
    """Hyper-parameters of :func:`train_rerank` (defaults chosen on Flickr8k dev)."""

    image_layer: int = 8
    text_layer: int = 6
    image_grid: int = 4
    embed_dim: int = 256
    hidden_dim: int = 1024
    width: int = 128
    layers: int = 2
    heads: int = 4
    ff_dim: int = 256
    dropout: float = 0.1
    projection_dropout: float = 0.3
    joint: bool = True
    warmup_epochs: int = 3
    epochs: int = 6
    queries_per_epoch: int = 6000
    query_batch: int = 32
    negatives: int = 7
    mine_top: int = 20
    contrastive_batch: int = 512
    learning_rate: float = 1e-3
    #: In joint epochs the bi-encoder's projections learn at this fraction of the rate, so
    #: the cross-encoder's loss refines what they share without undoing the first stage.
    joint_projection_rate: float = 0.2
    weight_decay: float = 0.05
    dev_queries: int = 500
    rerank_n: int = 20
    seed: int = 0


@dataclass(frozen=True)
class RerankEpochLog:
    """One epoch: the loss, the bi-encoder's dev metrics and the reranked dev sample's (with
    the cosine weight calibrated on that sample, in joint models)."""

    epoch: int
    loss: float
    dev: RetrievalReport | None
    reranked: RerankedReport | None
    cosine_weight: float | None = None

    def to_dict(self) -> dict[str, Any]:
        reranked = None
        if self.reranked is not None:
            report = self.reranked.report
            reranked = {
                "n": self.reranked.n,
                "text_to_image": report.text_to_image,
                "image_to_text": report.image_to_text,
                "rsum": report.rsum,
                "queries": [len(report.ranks_text_to_image), len(report.ranks_image_to_text)],
                "cosine_weight": self.cosine_weight,
            }
        return {
            "epoch": self.epoch,
            "loss": self.loss,
            "dev": self.dev.to_dict() if self.dev else None,
            "dev_reranked": reranked,
        }


def build_model(
    train: LayerFeatureSet, config: RerankTrainingConfig, backbone: str, layer_source: str
) -> CrossEncoder:
    model = CrossEncoder(
        RerankConfig(
            backbone=backbone,
            layer_source=layer_source,
            image_layer=config.image_layer,
            text_layer=config.text_layer,
            image_dim=train.image[config.image_layer].tokens.shape[1],
            text_dim=train.text[config.text_layer].tokens.shape[1],
            image_grid=config.image_grid,
            embed_dim=config.embed_dim,
            hidden_dim=config.hidden_dim,
            width=config.width,
            layers=config.layers,
            heads=config.heads,
            ff_dim=config.ff_dim,
            dropout=config.dropout,
            projection_dropout=config.projection_dropout,
            joint=config.joint,
        )
    )
    for projection in (model.image, model.image_tokens):
        if projection is not None:
            set_statistics(projection, train.image[config.image_layer])
    for projection in (model.text, model.text_tokens):
        if projection is not None:
            set_statistics(projection, train.text[config.text_layer])
    return model


def mine(
    query: torch.Tensor, collection: torch.Tensor, own: Callable[[int], np.ndarray], top: int
) -> np.ndarray:
    """``(Q, top)`` rows of ``(N, E)`` ``collection`` that ``(Q, E)`` ``query`` ranks highest,
    leaving out each query's own (``own(q)``: its true matches)."""
    pools = np.empty((len(query), top), dtype=np.int64)
    for start in range(0, len(query), CHUNK):
        scores = (query[start : start + CHUNK] @ collection.T).numpy()
        for offset, row in enumerate(scores):
            row[own(start + offset)] = -np.inf
        best = np.argpartition(-scores, top, axis=1)[:, :top]
        order = np.take_along_axis(scores, best, axis=1).argsort(axis=1)[:, ::-1]
        pools[start : start + len(scores)] = np.take_along_axis(best, order, axis=1)
    return pools


def listwise_loss(
    model: CrossEncoder, query: SideTokens, candidates: SideTokens, per_query: int
) -> torch.Tensor:
    """Cross-entropy of each query's true match (its first candidate) among its ``per_query``
    candidates by the cross-encoder's own score; ``candidates`` holds ``Q * per_query`` inputs,
    query by query."""
    scores = model.cross_score(repeat_side(query, per_query), candidates)
    scores = scores.view(len(query), per_query)
    targets = torch.zeros(len(query), dtype=torch.long)
    return F.cross_entropy(scores, targets)


def train_rerank(
    train: LayerFeatureSet,
    dev: LayerFeatureSet | None,
    config: RerankTrainingConfig,
    *,
    backbone: str,
    layer_source: str,
    checkpoint_dir: Path | None = None,
    on_epoch: Callable[[RerankEpochLog], None] | None = None,
    show_progress: bool = False,
) -> tuple[CrossEncoder, list[dict[str, Any]]]:
    """Train the joint (or, with ``joint=False``, the separate) model; see the module docstring.

    Returns the model of the best epoch (by the dev sample's reranked recalls; without ``dev``
    the last) and every epoch's :meth:`RerankEpochLog.to_dict`.
    """
    generator = seeded(config)
    model = build_model(train, config, backbone, layer_source)
    data = RerankData(train, config)
    dev_data = RerankData(dev, config) if dev is not None else None
    bi_encoder = {id(p) for m in (model.image, model.text) for p in m.parameters()}
    bi_encoder.add(id(model.log_logit_scale))
    # The score's weights and read-out are few and must move far: ten times the rate, no decay.
    scales = [model.token_weight, *model.out.parameters()]
    special = bi_encoder | {id(p) for p in scales}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in special]
    bi = [p for p in model.parameters() if id(p) in bi_encoder]
    groups: list[dict[str, Any]] = [
        {"params": bi},
        {"params": rest},
        {"params": scales, "weight_decay": 0.0},
    ]
    optimiser = torch.optim.AdamW(
        groups,
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
    )
    warm_steps = max(1, len(data.owner) // config.contrastive_batch)
    joint_steps = max(1, config.queries_per_epoch // config.query_batch)

    def warm(epoch: int) -> bool:
        return epoch <= config.warmup_epochs

    def losses(epoch: int) -> Iterator[torch.Tensor]:
        epoch_loop = _warmup_steps if warm(epoch) else _joint_steps
        return epoch_loop(model, data, config, generator)

    def group_rates(epoch: int, rate: float) -> list[float]:
        projection = 1.0 if warm(epoch) else config.joint_projection_rate
        return [rate * projection, rate, rate * _SCALE_RATE]

    def judge(epoch: int, loss: float) -> Judged[RerankEpochLog]:
        log = _evaluate(model, dev_data, config, epoch, loss, warm(epoch))
        score = None if log.reranked is None or dev_data is None else log.reranked.report.rsum
        return Judged(log, log.to_dict(), score)

    run = Run(
        model,
        optimiser,
        generator,
        config,
        losses,
        judge,
        steps=lambda epoch: warm_steps if warm(epoch) else joint_steps,
        label=lambda e: f"Rerank epoch {e} ({'bi-encoder' if warm(e) else 'joint'})",
        epochs=config.warmup_epochs + config.epochs,
        group_rates=group_rates,
    )
    return model, fit(
        run, checkpoint_dir=checkpoint_dir, on_epoch=on_epoch, show_progress=show_progress
    )


def _warmup_steps(
    model: CrossEncoder, data: RerankData, config: RerankTrainingConfig, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Bi-encoder losses over every caption once, in a random order."""
    order = torch.randperm(len(data.owner), generator=generator).numpy()
    for step in range(max(1, len(order) // config.contrastive_batch)):
        captions = order[step * config.contrastive_batch : (step + 1) * config.contrastive_batch]
        yield _contrastive(model, data, captions)


def _contrastive(model: CrossEncoder, data: RerankData, captions: np.ndarray) -> torch.Tensor:
    images = data.owner[captions]
    image = model.embed_pooled(data.image_means[images], None)
    text = model.embed_pooled(None, data.texts.read_pooled(captions))
    return symmetric_info_nce(image, text, torch.from_numpy(images), model.logit_scale)


def _joint_steps(
    model: CrossEncoder, data: RerankData, config: RerankTrainingConfig, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Mine hard negatives with the current bi-encoder, then yield the joint losses."""
    half = config.queries_per_epoch // 2
    captions = torch.randperm(len(data.owner), generator=generator)[:half].numpy()
    images = torch.randperm(len(data.images), generator=generator)[:half].numpy()
    image_vectors, text_vectors = data.embed(model)
    model.train()
    caption_pool = mine(
        text_vectors[captions],
        image_vectors,
        lambda q: data.owner[captions[q : q + 1]],
        config.mine_top,
    )
    image_pool = mine(
        image_vectors[images],
        text_vectors,
        lambda q: data.captions_of[images[q]],
        config.mine_top,
    )
    contrastive_order = torch.randperm(len(data.owner), generator=generator).numpy()
    per_side = max(1, config.query_batch // 2)
    per_query = 1 + config.negatives
    for step in range(max(1, config.queries_per_epoch // config.query_batch)):
        rows = np.arange(step * per_side, (step + 1) * per_side) % half
        picks = torch.rand(len(rows), config.mine_top, generator=generator).argsort(dim=1)
        negatives = picks[:, : config.negatives].numpy()
        # Captions ask for images: their own image first, then mined ones.
        t2i = np.concatenate(
            [
                data.owner[captions[rows]][:, None],
                np.take_along_axis(caption_pool[rows], negatives, axis=1),
            ],
            axis=1,
        )
        own_caption = torch.randint(0, 5, (len(rows),), generator=generator).numpy()
        positives = np.asarray(
            [
                data.captions_of[i][c % len(data.captions_of[i])]
                for i, c in zip(images[rows], own_caption, strict=True)
            ]
        )
        i2t = np.concatenate(
            [positives[:, None], np.take_along_axis(image_pool[rows], negatives, axis=1)], axis=1
        )
        cross = listwise_loss(
            model, data.text_side(captions[rows]), data.image_side(t2i.reshape(-1)), per_query
        ) + listwise_loss(
            model, data.image_side(images[rows]), data.text_side(i2t.reshape(-1)), per_query
        )
        start = (step * config.contrastive_batch) % len(contrastive_order)
        batch = contrastive_order[start : start + config.contrastive_batch]
        yield cross / 2 + _contrastive(model, data, batch)


def _evaluate(
    model: CrossEncoder,
    dev: RerankData | None,
    config: RerankTrainingConfig,
    epoch: int,
    loss: float,
    warm: bool,
) -> RerankEpochLog:
    if dev is None:
        return RerankEpochLog(epoch, loss, None, None)
    image, text = dev.embed(model)
    metrics = retrieval_metrics(image.numpy(), text.numpy(), dev.owner)
    if warm:
        return RerankEpochLog(epoch, loss, metrics, None)
    captions, images = dev_sample(config, len(dev.owner), len(dev.images))
    if model.config.joint:
        weight = calibrate_cosine_weight(
            model, dev, image.numpy(), text.numpy(), captions, images, config.rerank_n
        )
        model.cosine_weight.data.fill_(weight)
    reranked = reranked_retrieval(
        model,
        image.numpy(),
        text.numpy(),
        dev.owner,
        dev.sides,
        config.rerank_n,
        captions=captions,
        images=images,
        query_batch=16,
    )
    calibrated = float(model.cosine_weight) if model.config.joint else None  # separate: no cosine
    return RerankEpochLog(epoch, loss, metrics, reranked, calibrated)


def training_config(folder: Path) -> RerankTrainingConfig | None:
    """The config a reranker in ``folder`` was trained with (``training.json``), if recorded."""
    log = folder / TRAINING_RECORD
    if not log.is_file():
        return None
    return RerankTrainingConfig.from_dict(json.loads(log.read_text())["config"])


def dev_sample(
    config: RerankTrainingConfig, captions: int, images: int
) -> tuple[np.ndarray, np.ndarray]:
    """The dev caption and image rows that training reranks each epoch (and calibrates the
    cosine weight on), out of ``captions`` and ``images``: ``dev_queries`` captions and a
    fifth as many images, drawn with the run's seed. An evaluation that should not see them
    leaves these rows out."""
    sample = np.random.default_rng(config.seed)
    caption_rows = sample.choice(captions, min(config.dev_queries, captions), replace=False)
    image_rows = sample.choice(images, min(config.dev_queries // 5, images), replace=False)
    return np.sort(caption_rows), np.sort(image_rows)
