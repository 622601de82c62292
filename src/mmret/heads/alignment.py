"""Alignment projections: map two frozen towers' features into one shared embedding space."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmret._config import JsonConfig
from mmret.heads.folder import FolderHead

KIND = "alignment"


@dataclass(frozen=True)
class AlignmentConfig(JsonConfig):
    """Shape of an :class:`AlignmentHead`. ``hidden_dim == 0`` means purely linear projections."""

    image_dim: int
    text_dim: int
    embed_dim: int = 512
    hidden_dim: int = 0
    dropout: float = 0.1
    towers: str = ""


class Projection(nn.Module):
    """Standardise ``(B, in)`` features, then a linear map plus an optional residual MLP branch."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, dropout: float) -> None:
        super().__init__()
        # Statistics of the training features: standardising makes one learning rate fit both
        # towers, whose raw features differ in scale by orders of magnitude.
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_dim, out_dim)
        self.mlp = (
            nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))
            if hidden_dim > 0
            else None
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.dropout((features - self.mean) / self.std)
        out: torch.Tensor = self.linear(x)
        return out + self.mlp(x) if self.mlp is not None else out

    def set_statistics(self, features: torch.Tensor) -> None:
        self.mean.copy_(features.mean(dim=0))
        self.std.copy_(features.std(dim=0).clamp_min(1e-6))


class AlignmentHead(FolderHead):
    """Two projections and the learnable InfoNCE temperature (stored as a log logit scale)."""

    folder_kind = KIND
    config_type = AlignmentConfig

    def __init__(self, config: AlignmentConfig) -> None:
        super().__init__()
        self.config = config
        self.image = Projection(
            config.image_dim, config.embed_dim, config.hidden_dim, config.dropout
        )
        self.text = Projection(config.text_dim, config.embed_dim, config.hidden_dim, config.dropout)
        self.log_logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1 / 0.07), as in CLIP

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-norm ``(B, embed_dim)`` image and text embeddings."""
        return (
            nn.functional.normalize(self.image(image_features), dim=-1),
            nn.functional.normalize(self.text(text_features), dim=-1),
        )

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.exp().clamp(max=100.0)
