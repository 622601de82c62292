"""Contrastive losses as pure tensor functions."""

from __future__ import annotations

import torch
from torch.nn import functional as F  # noqa: N812 - the universal torch idiom


def symmetric_info_nce(
    image: torch.Tensor, text: torch.Tensor, groups: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over ``(B, D)`` unit-norm image/text pairs.

    ``groups`` ``(B,)`` names each pair's image: rows that share an image (several captions of
    one photo) are not used as each other's negatives, since they are not negatives at all.

    >>> x = F.normalize(torch.eye(3), dim=-1)
    >>> loss = symmetric_info_nce(x, x, torch.tensor([0, 1, 2]), torch.tensor(100.0))
    >>> bool(loss < 1e-3)
    True
    """
    return symmetric_info_nce_scores(logit_scale * image @ text.T, groups)


def symmetric_info_nce_scores(logits: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a ``(B, B)`` matrix of scaled scores whose diagonal holds the
    pairs; ``groups`` as in :func:`symmetric_info_nce` (rows and columns share them)."""
    same = groups[:, None] == groups[None, :]
    false_negatives = same & ~torch.eye(len(groups), dtype=torch.bool, device=groups.device)
    logits = logits.masked_fill(false_negatives, float("-inf"))
    targets = torch.arange(len(groups), device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def class_distillation(
    embeddings: torch.Tensor,
    classes: torch.Tensor,
    logit_scale: torch.Tensor,
    teacher: torch.Tensor,
) -> torch.Tensor:
    """Cross-entropy from a teacher's ``(B, C)`` class distribution to the student's: a softmax
    over the ``(B, E)`` embeddings' scaled similarities to ``(C, E)`` class embeddings.

    >>> x = F.normalize(torch.eye(3), dim=-1)
    >>> bool(class_distillation(x, x, torch.tensor(100.0), torch.eye(3)) < 1e-3)
    True
    """
    student = F.log_softmax(logit_scale * embeddings @ classes.T, dim=-1)
    return -(teacher * student).sum(dim=-1).mean()
