"""MMT-Retrieval's cross-encoder (Geigle et al., "Retrieve Fast, Rerank Smart", TACL 2022) on
frozen towers' token features, with the bi-encoder it shares its projections with.

Both sides of a pair (the query and a candidate) are token sets: an image is the spatial map of
one image layer average-pooled to a ``grid x grid`` set of tokens, a text the hidden states of
one text layer; an image+text side has both. The model holds

* a **bi-encoder**: per tower, a :class:`~mmret.heads.alignment.Projection` of the mean token
  into an ``embed_dim`` space (unit vectors, scored by cosine; an image+text side is the
  normalised sum of its two views, as :class:`~mmret.encoders.base.Encoder` combines them);
* a **cross-encoder**: every token of both sides in one sequence behind a CLS token, a small
  transformer whose attention runs across the two sides and the two modalities, and a linear
  match score read from the CLS token.

In the **joint** model (MMT's "one model, two ways of using it") the cross-encoder's token
embedding *is* the bi-encoder projection's linear map applied to each token (so the bi-encoder's
linear part is exactly the mean of the cross-encoder's token embeddings), and the match score
adds the bi-encoder's cosine with a weight set on dev data: the cross-encoder is trained on its
own score and the first stage's judgement is interpolated with it. A separate model
(``joint=False``, the ablation) gives the cross-encoder its own token embedding and no cosine
term. Sides are told apart by nothing but their tokens (modality embeddings only), so a score
does not depend on which side asked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - the universal torch idiom

from mmret._config import JsonConfig
from mmret.errors import InputError
from mmret.heads.alignment import Projection
from mmret.heads.folder import FolderHead
from mmret.layers import masked_mean

KIND = "rerank"
_CLS, _IMAGE, _TEXT = 0, 1, 2


@dataclass(frozen=True)
class RerankConfig(JsonConfig):
    """Shape of a :class:`CrossEncoder`.

    ``backbone`` is the encoder spec whose layer features it reads (``starter``) and
    ``layer_source`` what those depend on (its towers); it reads image layer ``image_layer``
    (``image_dim`` channels, pooled to ``image_grid`` x ``image_grid`` tokens) and text layer
    ``text_layer`` (``text_dim`` wide).
    """

    backbone: str
    layer_source: str
    image_layer: int
    text_layer: int
    image_dim: int
    text_dim: int
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


@dataclass(frozen=True)
class SideTokens:
    """Token features of ``B`` queries or candidates, each with an image, a text or both.

    ``image`` ``(B, Ti, image_dim)`` with mask ``(B, Ti)`` and ``text`` ``(B, Tt, text_dim)``
    with mask ``(B, Tt)``; masks are True for real tokens. A side without an image has no real
    image tokens (``Ti`` may be 0), and likewise for texts.
    """

    image: torch.Tensor
    image_mask: torch.Tensor
    text: torch.Tensor
    text_mask: torch.Tensor

    def __len__(self) -> int:
        return int(self.image.shape[0])

    def take(self, rows: torch.Tensor | list[int]) -> SideTokens:
        """The inputs ``rows`` of this side (a bool mask or indices)."""
        index = torch.as_tensor(rows)
        return SideTokens(
            self.image[index], self.image_mask[index], self.text[index], self.text_mask[index]
        )


def empty_side(size: int, image_dim: int, text_dim: int) -> SideTokens:
    """A side of ``size`` inputs with no tokens at all (the parts a side lacks start here)."""
    return SideTokens(
        torch.zeros(size, 0, image_dim),
        torch.zeros(size, 0, dtype=torch.bool),
        torch.zeros(size, 0, text_dim),
        torch.zeros(size, 0, dtype=torch.bool),
    )


def image_grid(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """``(B, grid*grid, D)``: a ``(B, H*W, D)`` square map (row-major) average-pooled to a grid.

    A map already of that size is returned as it is, so pooled maps can be stored.

    >>> image_grid(torch.ones(2, 49, 3), 4).shape
    torch.Size([2, 16, 3])
    """
    count, side = tokens.shape[1], round(tokens.shape[1] ** 0.5)
    if side * side != count:
        raise InputError(f"image tokens are not a square map: {count} tokens")
    if side == grid:
        return tokens
    batch, width = tokens.shape[0], tokens.shape[2]
    maps = tokens.transpose(1, 2).reshape(batch, width, side, side)
    return F.adaptive_avg_pool2d(maps, grid).flatten(2).transpose(1, 2)


class CrossEncoder(FolderHead):
    """The bi-encoder projections and the cross-encoder over both sides' tokens (see the
    module docstring)."""

    folder_kind = KIND
    config_type = RerankConfig

    def __init__(self, config: RerankConfig) -> None:
        super().__init__()
        self.config = config
        e = config.embed_dim
        p = config.projection_dropout
        self.image = Projection(config.image_dim, e, config.hidden_dim, p)
        self.text = Projection(config.text_dim, e, config.hidden_dim, p)
        self.log_logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1 / 0.07), as in CLIP
        # The separate ablation embeds tokens with maps of its own (linear, standardised).
        self.image_tokens = None if config.joint else Projection(config.image_dim, e, 0, 0.0)
        self.text_tokens = None if config.joint else Projection(config.text_dim, e, 0, 0.0)
        self.into = nn.Linear(e, config.width)
        self.kind = nn.Embedding(3, config.width)
        self.position = nn.Parameter(torch.zeros(config.image_grid**2, config.width))
        layer = nn.TransformerEncoderLayer(
            config.width,
            config.heads,
            config.ff_dim,
            config.dropout,
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.width)
        self.out = nn.Linear(config.width, 1)
        # Weight of the bi-encoder's cosine in the match score (joint model only). It is not
        # learnt with the cross-encoder: on training pairs the bi-encoder, fitted to the same
        # pairs, is over-confident, and a learnt weight leans on it; training sets it on dev
        # (see mmret.training.cross_encoder.calibrate_cosine_weight).
        self.cosine_weight = nn.Parameter(torch.tensor(15.0), requires_grad=False)
        # Weight of the token-level late interaction in the match score.
        self.token_weight = nn.Parameter(torch.tensor(5.0))

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.exp().clamp(max=100.0)

    # -- the bi-encoder ------------------------------------------------------------------

    def embed(self, side: SideTokens) -> torch.Tensor:
        """``(B, embed_dim)`` unit vectors: each view's projected mean token, an image+text
        side the normalised sum of its two views."""
        image = self.embed_pooled(self.pooled_image(side), None)
        text = self.embed_pooled(None, masked_mean(side.text, side.text_mask))
        has_image = side.image_mask.any(dim=1, keepdim=True)
        has_text = side.text_mask.any(dim=1, keepdim=True)
        return F.normalize(image * has_image + text * has_text, dim=-1)

    def pooled_image(self, side: SideTokens) -> torch.Tensor:
        """``(B, image_dim)`` mean of each side's image grid tokens."""
        return masked_mean(*self._grid(side))

    def _grid(self, side: SideTokens) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, G, image_dim)`` grid tokens of a side's images and their ``(B, G)`` mask (a
        map's tokens are all real, so a row is all True, or all False where there is no image).
        """
        if not side.image.shape[1]:
            return side.image, side.image_mask
        grid = image_grid(side.image, self.config.image_grid)
        mask = side.image_mask.any(dim=1, keepdim=True).expand(-1, grid.shape[1])
        return grid, mask

    def embed_pooled(self, image: torch.Tensor | None, text: torch.Tensor | None) -> torch.Tensor:
        """``(B, embed_dim)`` unit vectors of ``(B, image_dim)`` pooled image features or of
        ``(B, text_dim)`` pooled text features (exactly one is given)."""
        if image is not None:
            return F.normalize(self.image(image), dim=-1)
        assert text is not None
        return F.normalize(self.text(text), dim=-1)

    # -- the cross-encoder ---------------------------------------------------------------

    def forward(self, query: SideTokens, candidate: SideTokens) -> torch.Tensor:
        """``(B,)`` match scores of ``B`` query-candidate pairs (a query side of one input is
        paired with every candidate): the cross-encoder's score, plus in the joint model the
        bi-encoder's cosine times ``cosine_weight``."""
        score = self.cross_score(query, candidate)
        if self.config.joint:
            cosine = (self.embed(query) * self.embed(candidate)).sum(dim=-1)  # (1 or B) x B
            score = score + self.cosine_weight * cosine
        return score

    def cross_score(self, query: SideTokens, candidate: SideTokens) -> torch.Tensor:
        """``(B,)`` the cross-encoder's own scores of the pairs (as :meth:`forward`, without
        the bi-encoder's cosine): the CLS read-out plus the weighted token interaction."""
        batch = len(candidate)
        if len(query) not in (1, batch):
            raise InputError(f"{len(query)} queries for {batch} candidates")
        # One query's tokens and vector are computed once, then shared by every pair.
        embedded = [
            tuple(part.expand(batch, *part.shape[1:]) for part in self._embedded_tokens(query)),
            self._embedded_tokens(candidate),
        ]
        parts = [self._tokens(*side) for side in embedded]
        cls = (self.kind.weight[_CLS] + torch.zeros(batch, 1, self.config.width),)
        tokens = torch.cat([*cls, *(t for t, _ in parts)], dim=1)
        mask = torch.cat([torch.ones(batch, 1, dtype=torch.bool), *(m for _, m in parts)], dim=1)
        hidden = self.encoder(tokens, src_key_padding_mask=~mask)
        score: torch.Tensor = self.out(self.norm(hidden[:, 0])).squeeze(-1)
        return score + self.token_weight * token_interaction(*embedded[0][:2], *embedded[1][:2])

    def _embedded_tokens(self, side: SideTokens) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A side's image grid and text tokens in the ``embed_dim`` space, one sequence
        ``(B, T, E)``, their ``(B, T)`` mask and ``(B, T)`` kind (image or text)."""
        image_embedder = self.image if self.image_tokens is None else self.image_tokens
        text_embedder = self.text if self.text_tokens is None else self.text_tokens
        pieces, masks, kinds = [], [], []
        if side.image.shape[1]:
            grid, grid_mask = self._grid(side)
            pieces.append(linear_part(image_embedder, grid))
            masks.append(grid_mask)
            kinds.append(torch.full(grid_mask.shape, _IMAGE))
        if side.text.shape[1]:
            pieces.append(linear_part(text_embedder, side.text))
            masks.append(side.text_mask)
            kinds.append(torch.full(side.text_mask.shape, _TEXT))
        if not pieces:
            raise InputError("a query or candidate has neither an image nor a text")
        return torch.cat(pieces, dim=1), torch.cat(masks, dim=1), torch.cat(kinds, dim=1)

    def _tokens(
        self, tokens: torch.Tensor, mask: torch.Tensor, kinds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, T, width)`` transformer inputs of embedded tokens and their ``(B, T)`` mask."""
        hidden = self.into(tokens) + self.kind(kinds)
        grid = self.config.image_grid**2
        if kinds.shape[1] and bool((kinds[0, :grid] == _IMAGE).all()) and kinds.shape[1] >= grid:
            # Image tokens come first in a side and are a grid: give them their places.
            hidden = torch.cat([hidden[:, :grid] + self.position, hidden[:, grid:]], dim=1)
        return hidden, mask


def token_interaction(
    query: torch.Tensor,
    query_mask: torch.Tensor,
    candidate: torch.Tensor,
    candidate_mask: torch.Tensor,
) -> torch.Tensor:
    """``(B,)`` symmetric late interaction of ``(B, Tq, E)`` and ``(B, Tc, E)`` token sets: the
    mean over each side's real tokens of its best cosine with the other side's, averaged over
    both directions (a side's tokens are unit-normalised first).

    >>> x, all_real = torch.eye(3)[None], torch.ones(1, 3, dtype=torch.bool)
    >>> token_interaction(x, all_real, x[:, :2], all_real[:, :2])
    tensor([0.8333])
    """
    cosines = F.normalize(query, dim=-1) @ F.normalize(candidate, dim=-1).transpose(1, 2)
    pair = query_mask[:, :, None] & candidate_mask[:, None, :]
    cosines = cosines.masked_fill(~pair, -2.0)
    forward = masked_best(cosines.max(dim=2).values, query_mask)
    backward = masked_best(cosines.max(dim=1).values, candidate_mask)
    return (forward + backward) / 2


def masked_best(best: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` mean of ``(B, T)`` best cosines over the True positions of ``mask``."""
    weights = mask.to(best.dtype)
    return (best.clamp_min(-1.0) * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def linear_part(projection: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """A :class:`Projection`'s standardisation and linear map (no MLP branch) applied to every
    token of ``(B, T, D)``: ``(B, T, out)``. Both are affine, so the mean of the results is the
    linear part of the projection of the mean token."""
    assert isinstance(projection, Projection)
    # No dropout here: the bi-encoder drops pooled inputs, the transformer its own activations.
    standard = (tokens - projection.mean) / projection.std
    out: torch.Tensor = projection.linear(standard)
    return out
