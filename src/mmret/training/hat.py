"""Training a HAT head on stored layer features (``mmret train hat``): seeded and resumable.

Each step samples ``batch_size`` captions and their images, reads only those rows' pooled
layer features from the memory-mapped store, and minimises InfoNCE on the combined score plus
``level_loss`` times the mean of the per-level InfoNCE losses. After every epoch a checkpoint
(weights, optimiser moments, random states, history; safetensors + JSON, no pickle) is written
into ``checkpoint_dir``; a run given the same folder and config continues after the last
finished epoch and ends with the same head as an uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmret._config import JsonConfig
from mmret.cache.layer_features import LayerFeatureSet, StoredLayer
from mmret.errors import InputError
from mmret.evaluation.retrieval import RetrievalReport, retrieval_metrics
from mmret.heads.alignment import Projection
from mmret.heads.hat import HatConfig, HierarchicalAlignmentHead
from mmret.training.knowledge import LevelKnowledge
from mmret.training.loop import Judged, Run, fit, seeded
from mmret.training.losses import class_distillation, symmetric_info_nce

_CHUNK = 4096


@dataclass(frozen=True)
class HatTrainingConfig(JsonConfig):
    """Hyper-parameters of :func:`train_hat` (defaults chosen on Flickr8k dev)."""

    image_layers: tuple[int, ...] = (7, 8)
    text_layers: tuple[int, ...] = (4, 6)
    embed_dim: int = 256
    hidden_dim: int = 1024
    dropout: float = 0.3
    learn_weights: bool = False  # learnt weights did not beat uniform ones with two levels
    level_loss: float = 1.0
    epochs: int = 6
    batch_size: int = 512
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    seed: int = 0
    #: Weight of distilling the image tower's ImageNet classifier (0: off; needs knowledge).
    imagenet_weight: float = 0.0
    #: Temperature softening the classifier's distribution before distilling it.
    imagenet_temperature: float = 1.0


@dataclass(frozen=True)
class HatEpochLog:
    epoch: int
    loss: float
    weights: list[float]
    dev: RetrievalReport | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "loss": self.loss,
            "level_weights": self.weights,
            "dev": self.dev.to_dict() if self.dev else None,
        }


def pooled_levels(
    stored: dict[int, StoredLayer], layers: tuple[int, ...], rows: np.ndarray
) -> list[torch.Tensor]:
    """``(B, D_l)`` pooled features of ``rows`` at each of ``layers``, read from the store."""
    return [stored[layer].read_pooled(rows) for layer in layers]


def embed_set(
    head: HierarchicalAlignmentHead, features: LayerFeatureSet
) -> tuple[np.ndarray, np.ndarray]:
    """``(N, L*E)`` image and ``(T, L*E)`` text item vectors of a stored set, chunk by chunk."""
    config = head.config
    head.eval()

    def run(stored: dict[int, StoredLayer], layers: tuple[int, ...], image: bool) -> np.ndarray:
        count = len(stored[layers[0]])
        chunks = []
        for start in range(0, count, _CHUNK):
            rows = np.arange(start, min(start + _CHUNK, count))
            pooled = pooled_levels(stored, layers, rows)
            levels = head.image_levels(pooled) if image else head.text_levels(pooled)
            chunks.append(head.item_vectors(levels).numpy())
        return np.concatenate(chunks)

    with torch.inference_mode():
        return (
            run(features.image, config.image_layers, True),
            run(features.text, config.text_layers, False),
        )


def set_statistics(projection: torch.nn.Module, stored: StoredLayer) -> None:
    """Standardise with the store's mean and std, summed chunk by chunk (never all in memory)."""
    assert isinstance(projection, Projection)
    total = torch.zeros(stored.pooled.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, len(stored), _CHUNK):
        chunk = stored.read_pooled(np.arange(start, min(start + _CHUNK, len(stored)))).double()
        total += chunk.sum(dim=0)
        squares += (chunk * chunk).sum(dim=0)
    mean = total / len(stored)
    variance = (squares / len(stored) - mean * mean).clamp_min(0.0) * len(stored)
    std = (variance / max(len(stored) - 1, 1)).sqrt()
    projection.mean.copy_(mean.float())
    projection.std.copy_(std.float().clamp_min(1e-6))


def build_head(
    train: LayerFeatureSet, config: HatTrainingConfig, backbone: str, layer_source: str
) -> HierarchicalAlignmentHead:
    train.require(config.image_layers, config.text_layers)
    head = HierarchicalAlignmentHead(
        HatConfig(
            backbone=backbone,
            image_layers=config.image_layers,
            text_layers=config.text_layers,
            image_dims=tuple(train.image[n].pooled.shape[1] for n in config.image_layers),
            text_dims=tuple(train.text[n].pooled.shape[1] for n in config.text_layers),
            embed_dim=config.embed_dim,
            hidden_dim=config.hidden_dim,
            dropout=config.dropout,
            learn_weights=config.learn_weights,
            layer_source=layer_source,
        )
    )
    for projection, layer in zip(head.image, config.image_layers, strict=True):
        set_statistics(projection, train.image[layer])
    for projection, layer in zip(head.text, config.text_layers, strict=True):
        set_statistics(projection, train.text[layer])
    return head


def hat_loss(
    head: HierarchicalAlignmentHead,
    image: torch.Tensor,
    text: torch.Tensor,
    groups: torch.Tensor,
    level_loss: float,
) -> torch.Tensor:
    """InfoNCE on the combined score plus ``level_loss`` x the mean per-level InfoNCE.

    ``image`` and ``text`` are ``(B, L, E)`` level vectors of matching pairs.
    """
    scales = head.logit_scales
    combined = symmetric_info_nce(
        head.item_vectors(image), head.item_vectors(text), groups, scales[-1]
    )
    if level_loss == 0.0:
        return combined
    per_level = torch.stack(
        [
            symmetric_info_nce(image[:, level], text[:, level], groups, scales[level])
            for level in range(image.shape[1])
        ]
    )
    total: torch.Tensor = combined + per_level.mean() * level_loss
    return total


def train_hat(
    train: LayerFeatureSet,
    dev: LayerFeatureSet | None,
    config: HatTrainingConfig,
    *,
    backbone: str,
    layer_source: str,
    checkpoint_dir: Path | None = None,
    knowledge: LevelKnowledge | None = None,
    on_epoch: Callable[[HatEpochLog], None] | None = None,
    show_progress: bool = False,
) -> tuple[HierarchicalAlignmentHead, list[dict[str, Any]]]:
    """Train a HAT head; with ``dev``, keep the epoch of best dev RSUM (else the last).

    With ``config.imagenet_weight > 0`` (and ``knowledge``), each step also distils the image
    tower's ImageNet classifier: the batch images' combined similarities to the classes'
    prompts should rank the classes as the classifier does (as ``mmret train align`` does for
    the one-level head).

    Returns the head and the history of every epoch (:meth:`HatEpochLog.to_dict`), resumed
    epochs included.

    With ``checkpoint_dir``, each finished epoch is saved there and a later call with the same
    arguments resumes after it (a different config is refused rather than mixed in).
    """
    generator = seeded(config)
    head = build_head(train, config, backbone, layer_source)
    distil = _distillation(config, knowledge)
    trainable = [p for p in head.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(
        trainable, lr=config.learning_rate, weight_decay=config.weight_decay
    )
    owner = np.asarray(train.text_image, dtype=np.int64)
    steps = max(1, len(owner) // config.batch_size)

    def losses(epoch: int) -> Iterator[torch.Tensor]:
        order = torch.randperm(len(owner), generator=generator).numpy()
        for step in range(steps):
            captions = order[step * config.batch_size : (step + 1) * config.batch_size]
            images = owner[captions]
            image_levels = head.image_levels(
                pooled_levels(train.image, config.image_layers, images)
            )
            loss = hat_loss(
                head,
                image_levels,
                head.text_levels(pooled_levels(train.text, config.text_layers, captions)),
                torch.from_numpy(images),
                config.level_loss,
            )
            if distil is not None:
                class_text, teacher = distil
                classes = head.item_vectors(head.text_levels(class_text))
                loss = loss + config.imagenet_weight * class_distillation(
                    head.item_vectors(image_levels),
                    classes,
                    head.logit_scales[-1],
                    teacher[images],
                )
            yield loss

    def judge(epoch: int, loss: float) -> Judged[HatEpochLog]:
        metrics = None
        if dev is not None:
            metrics = retrieval_metrics(*embed_set(head, dev), np.asarray(dev.text_image))
        log = HatEpochLog(epoch, loss, head.weights.tolist(), metrics)
        return Judged.by_rsum(log, log.to_dict(), metrics)

    run = Run(head, optimiser, generator, config, losses, judge, steps, "HAT epoch {epoch}")
    return head, fit(
        run, checkpoint_dir=checkpoint_dir, on_epoch=on_epoch, show_progress=show_progress
    )


def _distillation(
    config: HatTrainingConfig, knowledge: LevelKnowledge | None
) -> tuple[list[torch.Tensor], torch.Tensor] | None:
    """The class prompts per level and the teacher's softened distribution per training image,
    when the config distils (else None)."""
    if config.imagenet_weight == 0.0:
        return None
    if knowledge is None or len(knowledge.class_text) != len(config.text_layers):
        raise InputError(
            "imagenet_weight > 0 needs the ImageNet knowledge of every text level "
            "(mmret.training.knowledge.imagenet_level_knowledge)"
        )
    logits = torch.from_numpy(np.asarray(knowledge.image_logits, dtype=np.float32))
    teacher = (logits / config.imagenet_temperature).softmax(dim=-1)
    class_text = [torch.from_numpy(np.asarray(c, dtype=np.float32)) for c in knowledge.class_text]
    return class_text, teacher
