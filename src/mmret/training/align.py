"""Training the starter model's alignment head on cached tower features (``mmret train align``)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from mmret.encoders.towers import TOWERS
from mmret.evaluation.retrieval import RetrievalReport, retrieval_metrics
from mmret.heads.alignment import AlignmentConfig, AlignmentHead
from mmret.training.features import PairFeatures
from mmret.training.knowledge import ClassKnowledge
from mmret.training.losses import class_distillation, symmetric_info_nce


@dataclass(frozen=True)
class AlignTrainingConfig:
    """Hyper-parameters of :func:`train_alignment` (defaults chosen on Flickr8k dev)."""

    embed_dim: int = 512
    hidden_dim: int = 1024
    dropout: float = 0.3
    epochs: int = 6
    batch_size: int = 512
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    seed: int = 0
    #: The tower pair the features come from (recorded in the head, which then loads them).
    towers: str = TOWERS
    #: Weight of the ImageNet distillation loss (0: off; needs a :class:`ClassKnowledge`).
    imagenet_weight: float = 0.0
    #: Temperature softening the ImageNet classifier's distribution before distilling it.
    imagenet_temperature: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EpochLog:
    epoch: int
    loss: float
    dev: RetrievalReport | None


def embed_pairs(head: AlignmentHead, features: PairFeatures) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm ``(N, E)`` image and ``(T, E)`` text embeddings of cached features."""
    head.eval()
    with torch.inference_mode():
        image = head.image(torch.from_numpy(np.array(features.image, dtype=np.float32)))
        text = head.text(torch.from_numpy(np.array(features.text, dtype=np.float32)))
        image = torch.nn.functional.normalize(image, dim=-1)
        text = torch.nn.functional.normalize(text, dim=-1)
    return image.numpy(), text.numpy()


def imagenet_distillation(
    head: AlignmentHead, image_emb: torch.Tensor, class_text: torch.Tensor, teacher: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy from the classifier's ``(B, C)`` class distribution ``teacher`` to the
    head's: a softmax over the ``(B, E)`` image embeddings' similarities to the ``(C, text_dim)``
    class prompts, projected by the text side (at the retrieval temperature)."""
    classes = torch.nn.functional.normalize(head.text(class_text), dim=-1)
    return class_distillation(image_emb, classes, head.logit_scale, teacher)


def train_alignment(
    train: PairFeatures,
    dev: PairFeatures | None = None,
    config: AlignTrainingConfig | None = None,
    *,
    knowledge: ClassKnowledge | None = None,
    on_epoch: Callable[[EpochLog], None] | None = None,
) -> tuple[AlignmentHead, list[EpochLog]]:
    """Train projections with symmetric InfoNCE; with ``dev``, keep the epoch of best RSUM.

    One step samples ``batch_size`` captions; same-image captions in a batch are masked out of
    each other's negatives. With ``knowledge`` and ``config.imagenet_weight > 0``, each step
    also distils the ImageNet classifier: the batch images' similarities to the projected class
    prompts should rank the classes as the classifier does (see :func:`imagenet_distillation`).
    Seeded: the same inputs and config give the same head.
    """
    config = config or AlignTrainingConfig()
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    head = AlignmentHead(
        AlignmentConfig(
            image_dim=train.image.shape[1],
            text_dim=train.text.shape[1],
            embed_dim=config.embed_dim,
            hidden_dim=config.hidden_dim,
            dropout=config.dropout,
            towers=config.towers,
        )
    )
    # Copies: the cached features are read-only memory maps, and they fit in memory.
    image = torch.from_numpy(np.array(train.image, dtype=np.float32))
    text = torch.from_numpy(np.array(train.text, dtype=np.float32))
    owner = torch.from_numpy(np.array(train.text_image, dtype=np.int64))
    head.image.set_statistics(image)
    head.text.set_statistics(text)
    distil = knowledge is not None and config.imagenet_weight > 0
    if distil:
        assert knowledge is not None
        class_text = torch.from_numpy(np.asarray(knowledge.class_text, dtype=np.float32))
        teacher = torch.from_numpy(np.asarray(knowledge.image_logits, dtype=np.float32))
        teacher = (teacher / config.imagenet_temperature).softmax(dim=-1)
    optimiser = torch.optim.AdamW(
        head.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    steps_per_epoch = max(1, len(text) // config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser,
        max_lr=config.learning_rate,
        total_steps=config.epochs * steps_per_epoch,
        pct_start=0.1,
    )
    best_state, best_rsum, logs = None, -1.0, []
    for epoch in range(1, config.epochs + 1):
        head.train()
        order = torch.randperm(len(text), generator=generator)
        total = 0.0
        for step in range(steps_per_epoch):
            batch = order[step * config.batch_size : (step + 1) * config.batch_size]
            image_emb, text_emb = head(image[owner[batch]], text[batch])
            loss = symmetric_info_nce(image_emb, text_emb, owner[batch], head.logit_scale)
            if distil:
                loss = loss + config.imagenet_weight * imagenet_distillation(
                    head, image_emb, class_text, teacher[owner[batch]]
                )
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss.detach())
        metrics = None
        if dev is not None:
            metrics = retrieval_metrics(*embed_pairs(head, dev), np.asarray(dev.text_image))
            if metrics.rsum > best_rsum:
                best_rsum, best_state = metrics.rsum, copy.deepcopy(head.state_dict())
        log = EpochLog(epoch, total / steps_per_epoch, metrics)
        logs.append(log)
        if on_epoch is not None:
            on_epoch(log)
    if best_state is not None:
        head.load_state_dict(best_state)
    return head.eval(), logs
