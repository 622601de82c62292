"""ReT's recurrent fusion of multi-layer features into latent tokens (Caffagni et al.,
"Recurrence-Enhanced Vision-and-Language Transformers for Robust Multimodal Document
Retrieval", CVPR 2025), on frozen towers' layer features.

A set of ``T`` latent tokens (learnt initial values) is the recurrent state. The cell walks
the chosen layers of both towers, step ``s`` reading image layer ``image_layers[s]`` and text
layer ``text_layers[s]``. At each step the state attends (cross-attention) to that layer's
visual tokens and to its textual tokens, each first projected to the model width; LSTM-like
sigmoid gates then mix them in::

    f   = sigmoid(W_f [h; a_v; a_t])          forget gate on the state
    i_v = sigmoid(W_v [h; a_v])               input gate of the visual update
    i_t = sigmoid(W_t [h; a_t])               input gate of the textual update
    h   = f * h + i_v * tanh(a_v) + i_t * tanh(a_t)
    h   = h + FFN(h)

The weights are shared by every step (that is what makes it recurrent); only each layer's input
projection is its own, since layer widths differ. An input without an image (or without a
text) has that modality removed: its attention output and its term are left out (``a`` is 0 in
the forget gate, the input term is dropped), so the output never depends on what sits in the
missing modality's tensor. The ablation without gates is a plain residual transformer over the
layers: ``h = h + a_v + a_t``.

A global path (``global_path``, on by default) adds to every output token a projection of the
mean of each present modality's last layer: what a one-vector head computes. Training starts
from that score and the latent tokens learn what a mean misses.

The output is ``T`` L2-normalised tokens of ``token_dim`` numbers, scored by late interaction
(:mod:`mmret.late_interaction`). Queries and documents have separate models (ReT-Q and ReT-D)
unless ``shared`` is set (an ablation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - the universal torch idiom

from mmret._config import JsonConfig
from mmret.errors import InputError
from mmret.heads.alignment import AlignmentConfig, AlignmentHead
from mmret.heads.folder import FolderHead
from mmret.layers import LayerFeatures, masked_mean

KIND = "ret"


@dataclass(frozen=True)
class RetConfig(JsonConfig):
    """Shape of a :class:`RetModel`.

    ``backbone`` is the encoder spec whose layer features the model reads (e.g. ``starter``);
    step ``s`` reads image layer ``image_layers[s]`` (width ``image_dims[s]``) and text layer
    ``text_layers[s]`` (width ``text_dims[s]``). Image maps with more than ``pool * pool``
    tokens on a square grid are average-pooled to ``pool x pool`` first (cheap, and the early
    stages' fine grids add little over their 7x7 summary).
    """

    backbone: str
    image_layers: tuple[int, ...]
    text_layers: tuple[int, ...]
    image_dims: tuple[int, ...]
    text_dims: tuple[int, ...]
    tokens: int = 32
    token_dim: int = 128
    width: int = 256
    heads: int = 4
    gates: bool = True
    shared: bool = False
    global_path: bool = True
    global_head: dict[str, Any] | None = None
    pool: int = 7
    dropout: float = 0.1
    layer_source: str = ""

    def __post_init__(self) -> None:
        sizes = {len(self.image_layers), len(self.text_layers)}
        sizes |= {len(self.image_dims), len(self.text_dims)}
        if len(sizes) != 1 or not self.image_layers:
            raise InputError(
                "a ReT model reads one image layer and one text layer per step, at least one "
                f"step: got image layers {list(self.image_layers)}, "
                f"text layers {list(self.text_layers)}"
            )
        if self.tokens < 1 or self.token_dim < 1 or self.width % self.heads:
            raise InputError(
                f"ReT needs at least one token of at least one number and a width divisible "
                f"by the heads: got tokens={self.tokens}, token_dim={self.token_dim}, "
                f"width={self.width}, heads={self.heads}"
            )

    @property
    def steps(self) -> int:
        return len(self.image_layers)

    @property
    def dim(self) -> int:
        """Width of a stored (flattened) token set."""
        return self.tokens * self.token_dim


def pool_grid(tokens: torch.Tensor, mask: torch.Tensor, side: int) -> tuple[torch.Tensor, ...]:
    """``(B, side*side, D)`` tokens and mask from a ``(B, H*W, D)`` square map with more cells.

    Token sets that are not square grids with every token real (texts, padded maps) are left
    as they are.
    """
    count = tokens.shape[1]
    grid = math.isqrt(count)
    if grid * grid != count or grid <= side or not bool(mask.all()):
        return tokens, mask
    batch, _, width = tokens.shape
    maps = tokens.transpose(1, 2).reshape(batch, width, grid, grid)
    pooled = F.adaptive_avg_pool2d(maps, side).flatten(2).transpose(1, 2)
    return pooled, torch.ones(pooled.shape[:2], dtype=torch.bool)


class _Inputs(nn.Module):
    """Per-layer input projections of one tower: LayerNorm of the raw features (the towers'
    layers differ in scale by orders of magnitude), then a linear map to the model width."""

    def __init__(self, dims: tuple[int, ...], width: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width)) for dim in dims
        )

    def forward(self, step: int, tokens: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers[step](tokens)
        return out


class RetCell(nn.Module):
    """One recurrent step: cross-attention to both modalities and the gated state update."""

    def __init__(self, width: int, heads: int, dropout: float, gates: bool) -> None:
        super().__init__()
        self.gates = gates
        self.norm = nn.LayerNorm(width)
        self.visual = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.textual = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        if gates:
            self.forget = nn.Linear(3 * width, width)
            self.visual_gate = nn.Linear(2 * width, width)
            self.textual_gate = nn.Linear(2 * width, width)
            # A forget bias of +1 starts the state mostly remembered (as LSTMs are initialised).
            nn.init.constant_(self.forget.bias, 1.0)
        self.ffn_norm = nn.LayerNorm(width)
        self.ffn = nn.Sequential(
            nn.Linear(width, 2 * width), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * width, width)
        )

    def attend(
        self,
        attention: nn.MultiheadAttention,
        query: torch.Tensor,
        tokens: torch.Tensor | None,
        mask: torch.Tensor | None,
        present: torch.Tensor,
    ) -> torch.Tensor:
        """``(B, T, W)`` attention output, exactly 0 for inputs without this modality."""
        if tokens is None or mask is None or not bool(present.any()):
            return torch.zeros_like(query)
        # An absent input gets one visible token so that softmax has something to normalise
        # over; its output is then replaced by 0, so that token's value never matters.
        visible = mask | ~present[:, None]
        visible[:, 0] |= ~present
        out, _ = attention(query, tokens, tokens, key_padding_mask=~visible, need_weights=False)
        return torch.where(present[:, None, None], out, torch.zeros_like(out))

    def forward(
        self,
        state: torch.Tensor,
        visual: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor],
        textual: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor],
    ) -> torch.Tensor:
        """The next ``(B, T, W)`` state; each modality is ``(tokens (B, N, W), mask (B, N),
        present (B,))`` with ``tokens`` None when no input of the batch has it."""
        query = self.norm(state)
        a_v = self.attend(self.visual, query, *visual)
        a_t = self.attend(self.textual, query, *textual)
        has_v = visual[2][:, None, None]
        has_t = textual[2][:, None, None]
        if not self.gates:
            update = torch.where(has_v, a_v, 0.0) + torch.where(has_t, a_t, 0.0)
            state = state + update
        else:
            forget = torch.sigmoid(self.forget(torch.cat([query, a_v, a_t], dim=-1)))
            i_v = torch.sigmoid(self.visual_gate(torch.cat([query, a_v], dim=-1)))
            i_t = torch.sigmoid(self.textual_gate(torch.cat([query, a_t], dim=-1)))
            state = (
                forget * state
                + torch.where(has_v, i_v * torch.tanh(a_v), 0.0)
                + torch.where(has_t, i_t * torch.tanh(a_t), 0.0)
            )
        out: torch.Tensor = state + self.ffn(self.ffn_norm(state))
        return out


class RetTower(nn.Module):
    """One side's model (ReT-Q or ReT-D): latent tokens, input projections, cell, output."""

    def __init__(self, config: RetConfig) -> None:
        super().__init__()
        self.config = config
        self.latents = nn.Parameter(torch.randn(config.tokens, config.width) * 0.02)
        self.image_in = _Inputs(config.image_dims, config.width)
        self.text_in = _Inputs(config.text_dims, config.width)
        self.cell = RetCell(config.width, config.heads, config.dropout, config.gates)
        self.out_norm = nn.LayerNorm(config.width)
        self.out = nn.Linear(config.width, config.token_dim)
        # The global path: each modality's last layer, mean-pooled, through the backbone's own
        # one-vector alignment head (a frozen copy, ``global_head``) or else a learnt linear
        # map, projected and added to every output token. Training starts from the one-vector
        # score and the latent tokens learn what a mean misses (on a CPU budget of a few
        # thousand steps, latents alone had not caught up; see the model card).
        self.global_head: AlignmentHead | None = None
        self.image_global: nn.Module | None = None
        self.text_global: nn.Module | None = None
        if config.global_path and config.global_head is not None:
            self.global_head = AlignmentHead(AlignmentConfig.from_dict(config.global_head))
            self.global_head.requires_grad_(False)
            self.global_out = nn.Linear(config.global_head["embed_dim"], config.token_dim)
            # Start from the head's score: tokens all equal to a projection of its vector.
            nn.init.orthogonal_(self.global_out.weight)
            for layer in (self.out, self.global_out):
                nn.init.zeros_(layer.bias)
            nn.init.zeros_(self.out.weight)
        elif config.global_path:
            self.image_global = _linear(config.image_dims[-1], config.token_dim)
            self.text_global = _linear(config.text_dims[-1], config.token_dim)

    def train(self, mode: bool = True) -> RetTower:
        super().train(mode)
        if self.global_head is not None:
            self.global_head.eval()  # frozen: its dropout must stay off
        return self

    def forward(
        self,
        image: LayerFeatures | None,
        text: LayerFeatures | None,
        image_present: torch.Tensor | None = None,
        text_present: torch.Tensor | None = None,
        head_vectors: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(B, T, token_dim)`` unit tokens from the layer features of a batch.

        ``image``/``text`` hold the configured layers, in order (None: no input has that
        modality); ``image_present``/``text_present`` ``(B,)`` mark which inputs have it
        (default: all of them when the features are given). ``head_vectors (B, E)``: the
        global head's unit embeddings of the inputs, made elsewhere (cross-fitted training
        feeds those of alignments that never saw the input); default: this tower's own head.
        """
        batch = _batch_size(image, text)
        image_present = _presence(image, image_present, batch)
        text_present = _presence(text, text_present, batch)
        state = self.latents.expand(batch, -1, -1)
        for step in range(self.config.steps):
            visual = self._inputs(self.image_in, image, step, image_present, pool=True)
            textual = self._inputs(self.text_in, text, step, text_present, pool=False)
            state = self.cell(state, visual, textual)
        tokens = self.out(self.out_norm(state))
        if self.global_head is not None:
            vectors = head_vectors
            if vectors is None:
                vectors = self._head_vectors(image, text, image_present, text_present)
            tokens = tokens + self.global_out(vectors)[:, None]
        for projection, features, present in (
            (self.image_global, image, image_present),
            (self.text_global, text, text_present),
        ):
            if projection is not None and features is not None:
                pooled = masked_mean(features.tokens[-1], features.masks[-1])
                tokens = tokens + torch.where(present[:, None], projection(pooled), 0.0)[:, None]
        return F.normalize(tokens, dim=-1)

    def _head_vectors(
        self,
        image: LayerFeatures | None,
        text: LayerFeatures | None,
        image_present: torch.Tensor,
        text_present: torch.Tensor,
    ) -> torch.Tensor:
        """``(B, E)`` the alignment head's embedding of each input, as the starter makes it
        (pooled image head map; pooled, normalised text layer; an image+text input the
        normalised sum of its two unit vectors)."""
        assert self.global_head is not None
        total = torch.zeros(len(image_present), self.global_head.config.embed_dim)
        if image is not None:
            vectors = self.global_head.image(masked_mean(image.tokens[-1], image.masks[-1]))
            total = total + torch.where(image_present[:, None], F.normalize(vectors, dim=-1), 0.0)
        if text is not None:
            pooled = F.normalize(masked_mean(text.tokens[-1], text.masks[-1]), dim=-1)
            vectors = F.normalize(self.global_head.text(pooled), dim=-1)
            total = total + torch.where(text_present[:, None], vectors, 0.0)
        return F.normalize(total, dim=-1)

    def _inputs(
        self,
        projections: _Inputs,
        features: LayerFeatures | None,
        step: int,
        present: torch.Tensor,
        *,
        pool: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        if features is None:
            return None, None, present
        tokens, mask = features.tokens[step], features.masks[step]
        if pool:
            tokens, mask = pool_grid(tokens, mask, self.config.pool)
        return projections(step, tokens), mask, present


def _linear(width: int, out: int) -> nn.Module:
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, out))


def _batch_size(image: LayerFeatures | None, text: LayerFeatures | None) -> int:
    sizes = {len(f.tokens[0]) for f in (image, text) if f is not None}
    if len(sizes) != 1:
        raise InputError("a ReT batch needs image or text features, of one batch size")
    return sizes.pop()


def _presence(
    features: LayerFeatures | None, present: torch.Tensor | None, batch: int
) -> torch.Tensor:
    if features is None:
        return torch.zeros(batch, dtype=torch.bool)
    if present is None:
        return torch.ones(batch, dtype=torch.bool)
    return present.bool()


class RetModel(FolderHead):
    """ReT-Q and ReT-D (one tower for both when ``config.shared``) and the InfoNCE scale."""

    folder_kind = KIND
    config_type = RetConfig

    def __init__(self, config: RetConfig) -> None:
        super().__init__()
        self.config = config
        self.query = RetTower(config)
        # A shared model registers one tower only (safetensors refuses aliased tensors).
        self._document = None if config.shared else RetTower(config)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(20.0)))

    @property
    def document(self) -> RetTower:
        return self.query if self._document is None else self._document

    def side(self, query: bool) -> RetTower:
        return self.query if query else self.document

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.exp().clamp(max=100.0)
