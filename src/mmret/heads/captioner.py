"""RA-CM3's retrieval-augmented generator, sized for captioning on a CPU.

Yasunaga et al. ("Retrieval-Augmented Multimodal Language Modeling", ICML 2023) prepend the
retrieved documents to the generator's input and train it to predict the documents too:
``L = -log p(x | m1..mK) - alpha * log p(m1..mK)``. Here the generator is a small causal
transformer that reads one sequence::

    [doc vector] doc words <sep>  ...  (K documents)  [query x P]  <bos> caption words <eos>

A document is its embedding (what the memory index stores for it, one token through a linear
map) followed by its caption's words; either part may be missing (an image-only or a text-only
document). The query image's embedding becomes ``P`` prefix tokens (ClipCap's mapping). Every
position attends to the ones before it, so the caption reads the documents and the documents
read the documents before them: the caption's words give ``-log p(x | m)``, the documents'
words ``-log p(m)``. With no documents it is the same decoder without retrieval (the baseline).

Positions count only real tokens, so a sequence may be padded on either side: training pads on
the right, generation on the left (every row's next token is then the last column).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - the universal torch idiom

from mmret._config import JsonConfig
from mmret.errors import InputError
from mmret.heads.folder import load_weights, read_head_config, save_head

KIND = "caption-decoder"

KeysValues = tuple[torch.Tensor, torch.Tensor]

# What each position holds (the segment embedding tells the model).
PAD, DOC_VECTOR, DOC_TEXT, QUERY, CAPTION = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class CaptionDecoderConfig(JsonConfig):
    """Shape of a :class:`CaptionDecoder`; ``encoder`` is the spec of the embedding space it
    reads (queries and documents must be embedded by that model)."""

    encoder: str
    vector_dim: int
    vocab_size: int
    documents: int = 5
    prefix: int = 4
    width: int = 256
    layers: int = 3
    heads: int = 4
    ff_dim: int = 1024
    dropout: float = 0.1
    max_words: int = 20
    max_length: int = 256

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise InputError(f"width {self.width} is not a multiple of heads {self.heads}")
        if self.documents < 0 or self.prefix < 1:
            raise InputError("a caption decoder needs documents >= 0 and prefix >= 1")


@dataclass(frozen=True)
class DecoderInput:
    """A padded batch of ``B`` sequences of length ``L``.

    ``kinds (B, L)``: PAD, DOC_VECTOR, DOC_TEXT, QUERY or CAPTION per position; ``tokens (B, L)``:
    the word id at text positions, the prefix slot at QUERY positions; ``vector_rows (B, L)``:
    the row of ``vectors (V, vector_dim)`` a DOC_VECTOR or QUERY position reads (else -1).
    """

    kinds: torch.Tensor
    tokens: torch.Tensor
    vector_rows: torch.Tensor
    vectors: torch.Tensor


class _Block(nn.Module):
    """A pre-norm transformer layer with causal self-attention."""

    def __init__(self, config: CaptionDecoderConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.attention_norm = nn.LayerNorm(config.width)
        self.qkv = nn.Linear(config.width, 3 * config.width)
        self.out = nn.Linear(config.width, config.width)
        self.mlp_norm = nn.LayerNorm(config.width)
        self.mlp = nn.Sequential(
            nn.Linear(config.width, config.ff_dim),
            nn.GELU(),
            nn.Linear(config.ff_dim, config.width),
        )
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, hidden: torch.Tensor, allowed: torch.Tensor, past: KeysValues | None = None
    ) -> tuple[torch.Tensor, KeysValues]:
        """``(B, L, W)`` -> ``(B, L, W)`` and this layer's keys and values (``past`` ones
        first); ``allowed (B, 1, L, past + L)`` says who attends to whom."""
        batch, length, width = hidden.shape
        q, k, v = (
            part.view(batch, length, self.heads, width // self.heads).transpose(1, 2)
            for part in self.qkv(self.attention_norm(hidden)).chunk(3, dim=-1)
        )
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        drop = self.dropout.p if self.training else 0.0
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=drop)
        hidden = hidden + self.dropout(self.out(attended.transpose(1, 2).reshape_as(hidden)))
        out: torch.Tensor = hidden + self.dropout(self.mlp(self.mlp_norm(hidden)))
        return out, (k, v)


@dataclass
class DecoderCache:
    """What generation keeps between steps: every layer's keys and values, which of the
    positions are real (``(B, L)``) and each row's next position (``(B,)``)."""

    layers: list[KeysValues]
    real: torch.Tensor
    next_position: torch.Tensor

    def select(self, rows: torch.Tensor) -> DecoderCache:
        """The cache of ``rows`` (``(R,)`` indices, repeats allowed: beam search)."""
        return DecoderCache(
            [(k[rows], v[rows]) for k, v in self.layers], self.real[rows], self.next_position[rows]
        )


class CaptionDecoder(nn.Module):
    """Reads a :class:`DecoderInput`, gives next-word logits at every position."""

    def __init__(self, config: CaptionDecoderConfig) -> None:
        super().__init__()
        self.config = config
        width = config.width
        self.words = nn.Embedding(config.vocab_size, width)
        self.positions = nn.Embedding(config.max_length, width)
        self.segments = nn.Embedding(CAPTION + 1, width)
        self.document = nn.Linear(config.vector_dim, width)
        self.query = nn.Linear(config.vector_dim, config.prefix * width)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(width)
        self.dropout = nn.Dropout(config.dropout)
        # GPT-2's initialisation: with the output layer tied to the word embedding, unit-variance
        # embeddings would start with logits of standard deviation sqrt(width).
        for table in (self.words, self.positions, self.segments):
            nn.init.normal_(table.weight, std=0.02)

    def embed(self, batch: DecoderInput) -> torch.Tensor:
        """``(B, L, W)`` input embeddings: words, document vectors and query prefixes, plus
        position and segment."""
        kinds, tokens = batch.kinds, batch.tokens
        if kinds.shape[1] > self.config.max_length:
            raise InputError(
                f"a sequence of {kinds.shape[1]} tokens exceeds the decoder's "
                f"{self.config.max_length}; use fewer documents"
            )
        text = (kinds == DOC_TEXT) | (kinds == CAPTION)
        hidden = self.words(torch.where(text, tokens, 0)) * text.unsqueeze(-1)
        documents = kinds == DOC_VECTOR
        if documents.any():
            rows = batch.vectors[batch.vector_rows[documents]]
            hidden = hidden.index_put((documents,), self.document(rows).to(hidden.dtype))
        queries = kinds == QUERY
        if queries.any():
            rows = batch.vectors[batch.vector_rows[queries]]
            prefixes = self.query(rows).view(-1, self.config.prefix, self.config.width)
            slots = prefixes[torch.arange(len(rows)), tokens[queries]]
            hidden = hidden.index_put((queries,), slots.to(hidden.dtype))
        real = kinds != PAD
        position = (real.long().cumsum(dim=1) - 1).clamp(min=0)
        out: torch.Tensor = hidden + self.positions(position) + self.segments(kinds)
        return out

    def forward(self, batch: DecoderInput) -> torch.Tensor:
        """``(B, L, W)`` final hidden states; :meth:`logits` of position ``t`` predict the
        token at ``t + 1``."""
        return self.prefill(batch)[0]

    def prefill(self, batch: DecoderInput) -> tuple[torch.Tensor, DecoderCache]:
        """:meth:`forward` that also returns the cache :meth:`step` continues from."""
        kinds = batch.kinds
        length = kinds.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=kinds.device).tril()
        real = kinds != PAD
        # A padding row would attend to nothing; it may see itself (its output is unused).
        allowed = (causal & real[:, None, None, :]) | torch.eye(
            length, dtype=torch.bool, device=kinds.device
        )
        hidden = self.dropout(self.embed(batch))
        layers = []
        for block in self.blocks:
            hidden, keys_values = block(hidden, allowed)
            layers.append(keys_values)
        cache = DecoderCache(layers, real, real.long().sum(dim=1))
        return self.norm(hidden), cache

    def step(self, cache: DecoderCache, words: torch.Tensor) -> tuple[torch.Tensor, DecoderCache]:
        """Append one caption word per row (``words (B,)``) after what ``cache`` holds:
        ``(B, W)`` hidden states of the new position and the extended cache."""
        position = cache.next_position.clamp(max=self.config.max_length - 1)
        hidden = self.words(words) + self.positions(position) + self.segments.weight[CAPTION]
        real = torch.cat([cache.real, torch.ones_like(cache.real[:, :1])], dim=1)
        allowed = real[:, None, None, :]
        hidden = hidden[:, None, :]
        layers = []
        for block, past in zip(self.blocks, cache.layers, strict=True):
            hidden, keys_values = block(hidden, allowed, past)
            layers.append(keys_values)
        return self.norm(hidden[:, 0]), DecoderCache(layers, real, cache.next_position + 1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(..., W)`` hidden states -> ``(..., vocab_size)`` next-word logits (the output
        layer is the word embedding, tied)."""
        return hidden @ self.words.weight.T

    def save(self, folder: Path, extra: dict[str, Any], *, half: bool = True) -> None:
        """Save to ``folder``; ``extra`` (the vocabulary, the retrieval policy) goes into the
        config beside the shape."""
        save_head(
            self,
            KIND,
            {**self.config.to_dict(), **extra},
            folder,
            dtype=torch.float16 if half else None,
        )

    @classmethod
    def load(cls, folder: Path) -> tuple[CaptionDecoder, dict[str, Any]]:
        """The decoder saved in ``folder`` and the rest of its config."""
        config = read_head_config(folder, KIND)
        fields = CaptionDecoderConfig.__dataclass_fields__
        model = cls(
            CaptionDecoderConfig.from_dict({k: v for k, v in config.items() if k in fields})
        )
        load_weights(model, folder)
        model.eval()
        return model, {k: v for k, v in config.items() if k not in fields}
