"""Training the starter model's alignment head on cached tower features (``mmret train align``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmret._config import JsonConfig
from mmret.cache.tower_features import PairFeatures
from mmret.encoders.towers import TOWERS
from mmret.evaluation.retrieval import retrieval_metrics
from mmret.heads.alignment import AlignmentConfig, AlignmentHead
from mmret.training.knowledge import ClassKnowledge
from mmret.training.loop import EpochLog, Judged, Run, fit, seeded
from mmret.training.losses import class_distillation, symmetric_info_nce


@dataclass(frozen=True)
class AlignTrainingConfig(JsonConfig):
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
    checkpoint_dir: Path | None = None,
    on_epoch: Callable[[EpochLog], None] | None = None,
    show_progress: bool = False,
) -> tuple[AlignmentHead, list[EpochLog]]:
    """Train projections with symmetric InfoNCE; with ``dev``, keep the epoch of best RSUM.

    One step samples ``batch_size`` captions; same-image captions in a batch are masked out of
    each other's negatives. With ``knowledge`` and ``config.imagenet_weight > 0``, each step
    also distils the ImageNet classifier: the batch images' similarities to the projected class
    prompts should rank the classes as the classifier does (see :func:`imagenet_distillation`).
    Seeded: the same inputs and config give the same head. With ``checkpoint_dir``, a later
    call with the same arguments resumes after the last finished epoch.
    """
    config = config or AlignTrainingConfig()
    generator = seeded(config)
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
    distil = None
    if knowledge is not None and config.imagenet_weight > 0:
        class_text = torch.from_numpy(np.asarray(knowledge.class_text, dtype=np.float32))
        logits = torch.from_numpy(np.asarray(knowledge.image_logits, dtype=np.float32))
        distil = class_text, (logits / config.imagenet_temperature).softmax(dim=-1)
    optimiser = torch.optim.AdamW(
        head.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    steps = max(1, len(text) // config.batch_size)

    def losses(epoch: int) -> Iterator[torch.Tensor]:
        order = torch.randperm(len(text), generator=generator)
        for step in range(steps):
            batch = order[step * config.batch_size : (step + 1) * config.batch_size]
            image_emb, text_emb = head(image[owner[batch]], text[batch])
            loss = symmetric_info_nce(image_emb, text_emb, owner[batch], head.logit_scale)
            if distil is not None:
                loss = loss + config.imagenet_weight * imagenet_distillation(
                    head, image_emb, distil[0], distil[1][owner[batch]]
                )
            yield loss

    logs: list[EpochLog] = []  # this call's epochs, with their raw ranks

    def judge(epoch: int, loss: float) -> Judged[EpochLog]:
        metrics = None
        if dev is not None:
            metrics = retrieval_metrics(*embed_pairs(head, dev), np.asarray(dev.text_image))
        logs.append(EpochLog(epoch, loss, metrics))
        return Judged.by_rsum(logs[-1], logs[-1].to_dict(), metrics)

    label = "Alignment epoch {epoch}"
    run = Run(head, optimiser, generator, config, losses, judge, steps, label, schedule="one-cycle")
    records = fit(
        run, checkpoint_dir=checkpoint_dir, on_epoch=on_epoch, show_progress=show_progress
    )
    resumed = [EpochLog.from_dict(record) for record in records[: len(records) - len(logs)]]
    return head, resumed + logs
