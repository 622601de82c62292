"""Image-text retrieval metrics in the standard (Flickr30k / COCO) protocol.

Text-to-image: each caption ranks every image; its own image is the only hit.
Image-to-text: each image ranks every caption; any of its captions is a hit (the best-ranked
one counts). Recall@K is the percentage of queries with a hit in the top K; ranks are 1-based.
Ties are broken in the query's favour.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

KS = (1, 5, 10)
_CHUNK = 1024


def ranks_text_to_image(image: np.ndarray, text: np.ndarray, text_image: np.ndarray) -> np.ndarray:
    """``(T,)`` 1-based rank of each caption's own image among ``(N, D)`` images."""
    ranks = np.empty(len(text), dtype=np.int64)
    for start in range(0, len(text), _CHUNK):
        sims = text[start : start + _CHUNK] @ image.T
        own = sims[np.arange(len(sims)), text_image[start : start + _CHUNK]]
        ranks[start : start + _CHUNK] = (sims > own[:, None]).sum(axis=1) + 1
    return ranks


def ranks_image_to_text(image: np.ndarray, text: np.ndarray, text_image: np.ndarray) -> np.ndarray:
    """``(N,)`` 1-based rank of each image's best-ranked caption among ``(T, D)`` captions."""
    ranks = np.empty(len(image), dtype=np.int64)
    for start in range(0, len(image), _CHUNK):
        sims = image[start : start + _CHUNK] @ text.T
        rows = np.arange(start, start + len(sims))
        own = text_image[None, :] == rows[:, None]
        best_own = np.where(own, sims, -np.inf).max(axis=1)
        ranks[start : start + _CHUNK] = (sims > best_own[:, None]).sum(axis=1) + 1
    return ranks


def recalls(ranks: np.ndarray, ks: tuple[int, ...] = KS) -> dict[str, float]:
    return {f"R@{k}": float(100.0 * np.mean(ranks <= k)) for k in ks}


@dataclass(frozen=True)
class RetrievalReport:
    """Recall@1/5/10 both ways (percent), median ranks, and the collection's size."""

    text_to_image: dict[str, float]
    image_to_text: dict[str, float]
    median_rank_text_to_image: float
    median_rank_image_to_text: float
    n_images: int
    n_texts: int

    @property
    def rsum(self) -> float:
        """The sum of the six recalls, the field's one-number summary."""
        return sum(self.text_to_image.values()) + sum(self.image_to_text.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "text_to_image": self.text_to_image,
            "image_to_text": self.image_to_text,
            "rsum": self.rsum,
            "median_rank": {
                "text_to_image": self.median_rank_text_to_image,
                "image_to_text": self.median_rank_image_to_text,
            },
            "n_images": self.n_images,
            "n_texts": self.n_texts,
        }


def retrieval_metrics(
    image: np.ndarray, text: np.ndarray, text_image: np.ndarray
) -> RetrievalReport:
    """Metrics for unit-norm ``(N, D)`` images and ``(T, D)`` texts; ``text_image[t]`` is
    caption t's image."""
    t2i = ranks_text_to_image(image, text, text_image)
    i2t = ranks_image_to_text(image, text, text_image)
    return RetrievalReport(
        recalls(t2i),
        recalls(i2t),
        float(np.median(t2i)),
        float(np.median(i2t)),
        len(image),
        len(text),
    )
