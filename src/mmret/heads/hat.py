"""HAT's hierarchical alignment head (Bin et al., "Unifying Two-Stream Encoders with Transformers
for Cross-Modal Retrieval", ACM MM 2023), on frozen towers' layer features.

Level ``l`` pairs an image layer with a text layer. Each level has its own projections of both
towers' pooled layer features into one ``embed_dim`` space, and its own cosine similarity; the
overall similarity is the weighted sum of the level cosines, with weights ``softmax(logits)``
learnt (or fixed uniform, the ablation). Low levels carry objects, colours and words, high
levels the scene and the sentence.

An item is stored as ONE vector: each level's unit vector scaled by ``sqrt(w_l)``,
concatenated (``levels * embed_dim`` numbers). The dot product of an image's and a text's
vectors is then exactly ``sum_l w_l cos_l``, so the ordinary index and every backend serve HAT
unchanged. Such a vector has norm 1, since the weights sum to 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mmret._config import JsonConfig
from mmret.errors import InputError
from mmret.heads.alignment import Projection
from mmret.heads.folder import FolderHead

KIND = "hat"


@dataclass(frozen=True)
class HatConfig(JsonConfig):
    """Shape of a :class:`HierarchicalAlignmentHead`.

    ``backbone`` is the encoder spec whose layer features the head reads (e.g. ``starter``);
    level ``l`` aligns image layer ``image_layers[l]`` (width ``image_dims[l]``) with text
    layer ``text_layers[l]`` (width ``text_dims[l]``).
    """

    backbone: str
    image_layers: tuple[int, ...]
    text_layers: tuple[int, ...]
    image_dims: tuple[int, ...]
    text_dims: tuple[int, ...]
    embed_dim: int = 256
    hidden_dim: int = 1024
    dropout: float = 0.3
    learn_weights: bool = True
    layer_source: str = ""

    def __post_init__(self) -> None:
        sizes = {len(self.image_layers), len(self.text_layers)}
        sizes |= {len(self.image_dims), len(self.text_dims)}
        if len(sizes) != 1 or not self.image_layers:
            raise InputError(
                "a HAT head needs one image layer and one text layer per level, at least one "
                f"level: got image layers {list(self.image_layers)}, "
                f"text layers {list(self.text_layers)}"
            )

    @property
    def levels(self) -> int:
        return len(self.image_layers)

    @property
    def dim(self) -> int:
        """Width of a stored item vector."""
        return self.levels * self.embed_dim


class HierarchicalAlignmentHead(FolderHead):
    """Per-level projections, level weights and per-level plus combined temperatures."""

    folder_kind = KIND
    config_type = HatConfig

    def __init__(self, config: HatConfig) -> None:
        super().__init__()
        self.config = config
        self.image = nn.ModuleList(
            Projection(dim, config.embed_dim, config.hidden_dim, config.dropout)
            for dim in config.image_dims
        )
        self.text = nn.ModuleList(
            Projection(dim, config.embed_dim, config.hidden_dim, config.dropout)
            for dim in config.text_dims
        )
        # Uniform weights to start; frozen at uniform when they are not learnt (the ablation).
        self.level_logits = nn.Parameter(
            torch.zeros(config.levels), requires_grad=config.learn_weights
        )
        # One temperature per level, and the last one for the combined score.
        self.log_logit_scales = nn.Parameter(torch.full((config.levels + 1,), 2.659))

    @property
    def weights(self) -> torch.Tensor:
        """``(L,)`` level weights, positive and summing to 1."""
        return torch.softmax(self.level_logits, dim=0)

    @property
    def logit_scales(self) -> torch.Tensor:
        """``(L + 1,)`` InfoNCE scales: one per level, then the combined score's."""
        return self.log_logit_scales.exp().clamp(max=100.0)

    def image_levels(self, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
        """``(B, L, E)`` unit vectors per level from ``(B, D_l)`` pooled image layer features."""
        return _levels(self.image, pooled)

    def text_levels(self, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
        """``(B, L, E)`` unit vectors per level from ``(B, D_l)`` pooled text layer features."""
        return _levels(self.text, pooled)

    def item_vectors(self, levels: torch.Tensor) -> torch.Tensor:
        """``(B, L * E)`` stored vectors: each level's unit vector times ``sqrt(w_l)``."""
        scaled = levels * self.weights.sqrt()[None, :, None]
        return scaled.flatten(1)


def _levels(projections: nn.ModuleList, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
    if len(pooled) != len(projections):
        raise InputError(f"expected features of {len(projections)} layers, got {len(pooled)}")
    projected = [
        projection(features) for projection, features in zip(projections, pooled, strict=True)
    ]
    return nn.functional.normalize(torch.stack(projected, dim=1), dim=-1)


def level_similarities(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``(L, N, T)`` cosine per level between ``(N, L, E)`` image and ``(T, L, E)`` text levels.

    >>> x = torch.nn.functional.normalize(torch.ones(2, 3, 4), dim=-1)
    >>> level_similarities(x, x).shape
    torch.Size([3, 2, 2])
    """
    return torch.einsum("nle,tle->lnt", image, text)
