"""A weightless, deterministic encoder for tests and for wiring up pipelines: ``hash:DIM``.

Texts become the sum of one fixed random vector per lower-cased word; images become a fixed
random projection of their 8x8 thumbnail. Identical inputs get identical vectors and texts
sharing words are similar, but images and texts are *not* aligned: use it to test plumbing,
never to judge quality.

``hash-tokens:TxD`` is its multi-vector twin for testing late interaction: the same hashing at
``T * D`` dimensions, read as ``T`` unit tokens of ``D`` (each token an independent random
projection of the same words or thumbnail).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from mmret.encoders.base import Content, Encoder
from mmret.encoders.registry import ENCODERS
from mmret.errors import InputError
from mmret.items import ImageInput
from mmret.late_interaction import normalise_tokens

_WORD = re.compile(r"\w+")
_THUMB = 8


def _word_vector(word: str, dim: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


class HashEncoder(Encoder):
    image_size = _THUMB

    def __init__(self, dim: int = 64) -> None:
        self.dim = dim
        self.spec = f"hash:{dim}"
        self._projection = (
            np.random.default_rng(dim)
            .standard_normal((_THUMB * _THUMB * 3, dim))
            .astype(np.float32)
        )

    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        thumbs = np.stack(
            [
                np.asarray(image.resize((_THUMB, _THUMB)), dtype=np.float32).ravel()
                for image in images
            ]
        )
        centred = thumbs / 255.0 - 0.5
        return torch.from_numpy(centred @ self._projection)

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        rows = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in _WORD.findall(text.lower()):
                rows[row] += _word_vector(word, self.dim)
        return torch.from_numpy(rows)


@ENCODERS.register("hash")
def load_hash(dim: str) -> HashEncoder:
    if not dim:
        return HashEncoder()
    if not dim.isdigit() or not 2 <= int(dim) <= 4096:
        raise InputError(f"hash encoder dimension must be an integer in [2, 4096], got {dim!r}")
    return HashEncoder(int(dim))


class TokenHashEncoder(HashEncoder):
    """``(N, tokens * token_dim)`` flattened sets of ``tokens`` unit tokens (see the module
    docstring); ``token_dim`` marks it multi-vector."""

    def __init__(self, tokens: int = 4, token_dim: int = 16) -> None:
        super().__init__(tokens * token_dim)
        self.token_dim = token_dim
        self.spec = f"hash-tokens:{tokens}x{token_dim}"

    def encode_images(
        self, images: Sequence[ImageInput], *, show_progress: bool = False
    ) -> np.ndarray:
        return normalise_tokens(super().encode_images(images), self.token_dim)

    def encode_texts(self, texts: Sequence[str], *, show_progress: bool = False) -> np.ndarray:
        return normalise_tokens(super().encode_texts(texts), self.token_dim)

    def encode(self, contents: Sequence[Content], *, show_progress: bool = False) -> np.ndarray:
        return normalise_tokens(super().encode(contents), self.token_dim)


@ENCODERS.register("hash-tokens")
def load_token_hash(shape: str) -> TokenHashEncoder:
    if not shape:
        return TokenHashEncoder()
    tokens, _, token_dim = shape.partition("x")
    if not (tokens.isdigit() and token_dim.isdigit()) or not (
        1 <= int(tokens) <= 256 and 2 <= int(token_dim) <= 4096
    ):
        raise InputError(
            f"hash-tokens shape must be TOKENSxDIM (1-256 tokens of 2-4096 dims), got {shape!r}"
        )
    return TokenHashEncoder(int(tokens), int(token_dim))
