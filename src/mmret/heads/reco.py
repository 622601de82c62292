"""RECO fusion: refine an embedding with the cross-modal partners of its memory neighbours.

Two fusions share one interface, ``fuse(query (B, D), gathered (B, k, D), valid (B, k),
modality) -> (B, D)`` unit vectors, where ``modality`` is the query's ("image": an image fused
with k texts; "text": a text fused with k images):

* :class:`TransformerFusion` (trained, the default): one pre-norm self-attention layer over the
  query token and the k gathered tokens (a learned type embedding tells them apart), read out at
  the query's position, one such layer per query modality. Only the query position's output is
  used, so only its attention row and feed-forward are computed: the same numbers as a full
  encoder layer at a third of the cost. The output projections start at zero, so an untrained
  fusion returns its input unchanged (training starts from the frozen model).
* :class:`MeanFusion` (no weights): ``normalise(query + mean(valid gathered))``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Self

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - the universal torch idiom

from mmret._config import JsonConfig
from mmret.errors import InputError
from mmret.heads.folder import WEIGHTS_FILE, FolderHead

KIND = "reco-fusion"
SHIPPED = Path(__file__).resolve().parent.parent / "weights"
#: encoder spec -> folder of the trained fusion that ships for it.
SHIPPED_FUSIONS = {
    "starter": SHIPPED / "reco-starter",
    "starter-v3": SHIPPED / "reco-starter-v3",
    "starter-v4": SHIPPED / "reco-starter-v4",
}


class Fusion(Protocol):
    """Anything that refines query embeddings with gathered partner embeddings."""

    def fuse(
        self, query: torch.Tensor, gathered: torch.Tensor, valid: torch.Tensor, modality: str
    ) -> torch.Tensor: ...

    def identity(self) -> dict[str, Any]:
        """What an index records to tell this fusion apart from any other."""
        ...


class MeanFusion:
    """``normalise(query + mean of the valid gathered vectors)``: the untrained baseline."""

    def fuse(
        self, query: torch.Tensor, gathered: torch.Tensor, valid: torch.Tensor, modality: str
    ) -> torch.Tensor:
        weights = valid.to(gathered.dtype).unsqueeze(-1)
        mean = (gathered * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        return F.normalize(query + mean, dim=-1)

    def identity(self) -> dict[str, Any]:
        return {"kind": "mean"}


@dataclass(frozen=True)
class FusionConfig(JsonConfig):
    """Shape of a :class:`TransformerFusion`, and the encoder whose space it was trained in."""

    dim: int
    heads: int = 8
    ff_dim: int = 512
    dropout: float = 0.1
    encoder: str = ""


class QueryAttentionLayer(nn.Module):
    """A pre-norm transformer encoder layer evaluated at position 0 only.

    ``tokens (B, 1 + k, D)`` with ``pad (B, 1 + k)`` (True: ignore) -> ``(B, D)``.
    """

    def __init__(self, dim: int, heads: int, ff_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        last = nn.Linear(ff_dim, dim)
        self.feed_forward = nn.Sequential(
            nn.Linear(dim, ff_dim), nn.GELU(), nn.Dropout(dropout), last
        )
        self.dropout = nn.Dropout(dropout)
        # Zero residual branches: the layer starts as the identity on the query token.
        nn.init.zeros_(self.attention.out_proj.weight)
        nn.init.zeros_(self.attention.out_proj.bias)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, tokens: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        normed = self.norm1(tokens)
        attended, _ = self.attention(
            normed[:, :1], normed, normed, key_padding_mask=pad, need_weights=False
        )
        x = tokens[:, 0] + self.dropout(attended[:, 0])
        out: torch.Tensor = x + self.dropout(self.feed_forward(self.norm2(x)))
        return out


class ModalityFusion(nn.Module):
    """One query modality's fusion: ``query (B, D)``, ``gathered (B, k, D)``, ``valid (B, k)``
    -> refined unit ``(B, D)``."""

    def __init__(self, config: FusionConfig) -> None:
        super().__init__()
        # Unit vectors have coordinates ~1/sqrt(D); scaling them to ~1 suits LayerNorm'd
        # attention and keeps the learned type embeddings on the same scale.
        self.scale = math.sqrt(config.dim)
        self.types = nn.Parameter(torch.zeros(2, config.dim))
        self.layer = QueryAttentionLayer(config.dim, config.heads, config.ff_dim, config.dropout)

    def forward(
        self, query: torch.Tensor, gathered: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        tokens = torch.cat(
            [(query * self.scale + self.types[0])[:, None], gathered * self.scale + self.types[1]],
            dim=1,
        )
        pad = torch.cat([torch.zeros_like(valid[:, :1]), ~valid], dim=1)
        return F.normalize(self.layer(tokens, pad), dim=-1)


class TransformerFusion(FolderHead):
    """The trained RECO fusion: one :class:`ModalityFusion` per query modality and the InfoNCE
    temperature it was trained with (as a log logit scale)."""

    folder_kind = KIND
    config_type = FusionConfig

    def __init__(self, config: FusionConfig) -> None:
        super().__init__()
        self.config = config
        self.image = ModalityFusion(config)
        self.text = ModalityFusion(config)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self._identity: dict[str, Any] = {"kind": "transformer", "weights": "untrained"}

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.exp().clamp(max=100.0)

    def fuse(
        self, query: torch.Tensor, gathered: torch.Tensor, valid: torch.Tensor, modality: str
    ) -> torch.Tensor:
        fusion = self.image if modality == "image" else self.text
        refined: torch.Tensor = fusion(query, gathered, valid)
        return refined

    def identity(self) -> dict[str, Any]:
        return dict(self._identity)

    @classmethod
    def load(cls, folder: Path) -> Self:
        fusion = super().load(folder)
        digest = hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest()[:16]
        fusion._identity = {"kind": "transformer", "weights": digest}
        return fusion


def load_fusion(spec: str | Path, encoder: str) -> Fusion:
    """``"mean"``, ``"transformer"`` (the fusion shipped for ``encoder``) or a folder saved by
    ``mmret train reco``. A trained fusion must have been trained for ``encoder``'s space."""
    if spec == "mean":
        return MeanFusion()
    if spec == "transformer":
        if encoder not in SHIPPED_FUSIONS:
            raise InputError(
                f"no trained fusion ships for encoder {encoder!r} (only for "
                f"{', '.join(sorted(SHIPPED_FUSIONS))}): train one with `mmret train reco` "
                "and pass its folder, or use the mean fusion"
            )
        folder = SHIPPED_FUSIONS[encoder]
    else:
        folder = Path(spec)
        if not folder.is_dir():
            raise InputError(f"fusion {spec!s}: not 'transformer', 'mean' or a fusion folder")
    fusion = TransformerFusion.load(folder)
    if fusion.config.encoder != encoder:
        raise InputError(
            f"fusion {folder} was trained for encoder {fusion.config.encoder!r}, but the "
            f"memory was built with {encoder!r}: their embedding spaces differ (train a fusion "
            "for this encoder with `mmret train reco`)"
        )
    return fusion
