"""A weightless, deterministic encoder for tests and for wiring up pipelines: ``hash:DIM``.

Texts become the sum of one fixed random vector per lower-cased word; images become a fixed
random projection of their 8x8 thumbnail. Identical inputs get identical vectors and texts
sharing words are similar, but images and texts are *not* aligned: use it to test plumbing,
never to judge quality.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
import torch
from PIL import Image

from mmret.encoders.base import Encoder
from mmret.encoders.registry import ENCODERS
from mmret.errors import InputError

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
