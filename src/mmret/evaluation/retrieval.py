"""Image-text retrieval metrics in the standard (Flickr30k / COCO) protocol.

Text-to-image: each caption ranks every image; its own image is the only hit.
Image-to-text: each image ranks every caption; any of its captions is a hit (the best-ranked
one counts). Recall@K is the percentage of queries with a hit in the top K; ranks are 1-based.
Ties are broken in the query's favour: a rank counts only the candidates scoring strictly
higher than the hit.

Scores are :func:`mmret.late_interaction.similarity`: inner products, or MaxSim for a
multi-vector model (``token_dim`` set). A model with separate query and document sides (ReT)
passes the query side's embeddings as ``image_queries`` / ``text_queries``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mmret.late_interaction import similarity

KS = (1, 5, 10)
#: The Ks of the Recall@K curves the reports plot.
CURVE_KS = tuple(range(1, 51))
_CHUNK = 1024


def ranks_text_to_image(
    image: np.ndarray,
    text: np.ndarray,
    text_image: np.ndarray,
    token_dim: int | None = None,
    image_offset: np.ndarray | None = None,
) -> np.ndarray:
    """``(T,)`` 1-based rank of each caption's own image among ``(N, D)`` images, by their
    scores minus ``image_offset (N,)`` if given (a query bank's discount).

    >>> image = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> text = np.array([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8]])
    >>> ranks_text_to_image(image, text, np.array([0, 1, 1])).tolist()
    [1, 2, 1]
    """
    ranks = np.empty(len(text), dtype=np.int64)
    for start in range(0, len(text), _CHUNK):
        sims = similarity(text[start : start + _CHUNK], image, token_dim)
        if image_offset is not None:
            sims = sims - image_offset[None, :]
        own = sims[np.arange(len(sims)), text_image[start : start + _CHUNK]]
        ranks[start : start + _CHUNK] = (sims > own[:, None]).sum(axis=1) + 1
    return ranks


def ranks_image_to_text(
    image: np.ndarray,
    text: np.ndarray,
    text_image: np.ndarray,
    token_dim: int | None = None,
    text_offset: np.ndarray | None = None,
) -> np.ndarray:
    """``(N,)`` 1-based rank of each image's best-ranked caption among ``(T, D)`` captions, by
    their scores minus ``text_offset (T,)`` if given.

    >>> image = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> text = np.array([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    >>> ranks_image_to_text(image, text, np.array([0, 0, 1])).tolist()
    [1, 2]
    """
    ranks = np.empty(len(image), dtype=np.int64)
    for start in range(0, len(image), _CHUNK):
        sims = similarity(image[start : start + _CHUNK], text, token_dim)
        if text_offset is not None:
            sims = sims - text_offset[None, :]
        rows = np.arange(start, start + len(sims))
        own = text_image[None, :] == rows[:, None]
        best_own = np.where(own, sims, -np.inf).max(axis=1)
        ranks[start : start + _CHUNK] = (sims > best_own[:, None]).sum(axis=1) + 1
    return ranks


def recalls(ranks: np.ndarray, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Recall@K in percent from ``(Q,)`` 1-based ranks of each query's best hit.

    >>> recalls(np.array([1, 3, 12, 5]))
    {'R@1': 25.0, 'R@5': 75.0, 'R@10': 75.0}
    """
    return {f"R@{k}": float(100.0 * np.mean(ranks <= k)) for k in ks}


def recall_curve(ranks: np.ndarray, max_k: int = CURVE_KS[-1]) -> np.ndarray:
    """``(max_k,)`` Recall@K in percent for K = 1..max_k from ``(Q,)`` 1-based ranks.

    >>> recall_curve(np.array([1, 2, 2, 4]), max_k=4).tolist()
    [25.0, 75.0, 75.0, 100.0]
    """
    counts = np.bincount(np.minimum(ranks, max_k + 1) - 1, minlength=max_k + 1)[:max_k]
    curve: np.ndarray = 100.0 * np.cumsum(counts) / max(len(ranks), 1)
    return curve


@dataclass(frozen=True)
class RetrievalReport:
    """Recall@1/5/10 both ways (percent), median ranks, and the collection's size.

    ``ranks_text_to_image (T,)`` and ``ranks_image_to_text (N,)`` keep the raw ranks, for
    curves and per-query analysis.
    """

    text_to_image: dict[str, float]
    image_to_text: dict[str, float]
    median_rank_text_to_image: float
    median_rank_image_to_text: float
    n_images: int
    n_texts: int
    ranks_text_to_image: np.ndarray
    ranks_image_to_text: np.ndarray

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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RetrievalReport:
        """A report read back from :meth:`to_dict` (a training history): its recalls and
        median ranks, without the raw ranks, which are not kept there."""
        empty = np.zeros(0, dtype=np.int64)
        return cls(
            data["text_to_image"],
            data["image_to_text"],
            data["median_rank"]["text_to_image"],
            data["median_rank"]["image_to_text"],
            data["n_images"],
            data["n_texts"],
            empty,
            empty,
        )


def retrieval_metrics(
    image: np.ndarray,
    text: np.ndarray,
    text_image: np.ndarray,
    *,
    token_dim: int | None = None,
    image_queries: np.ndarray | None = None,
    text_queries: np.ndarray | None = None,
    offsets: tuple[np.ndarray, np.ndarray] | None = None,
) -> RetrievalReport:
    """Metrics for unit-norm ``(N, D)`` images and ``(T, D)`` texts; ``text_image[t]`` is
    caption t's image. ``image_queries`` / ``text_queries`` (default: ``image`` / ``text``)
    are what ranks the other side, for models that embed queries differently. ``offsets``:
    ``(N,)`` and ``(T,)`` amounts subtracted from the images' and the texts' scores (a query
    bank's discounts, :mod:`mmret.query_bank`)."""
    queries_t = text if text_queries is None else text_queries
    queries_i = image if image_queries is None else image_queries
    image_offset, text_offset = offsets if offsets is not None else (None, None)
    t2i = ranks_text_to_image(image, queries_t, text_image, token_dim, image_offset)
    i2t = ranks_image_to_text(queries_i, text, text_image, token_dim, text_offset)
    return report_from_ranks(t2i, i2t, len(image), len(text))


def report_from_ranks(
    t2i: np.ndarray, i2t: np.ndarray, n_images: int, n_texts: int
) -> RetrievalReport:
    """The report of ``(T,)`` text-to-image and ``(N,)`` image-to-text 1-based ranks."""
    return RetrievalReport(
        recalls(t2i),
        recalls(i2t),
        float(np.median(t2i)),
        float(np.median(i2t)),
        n_images,
        n_texts,
        t2i,
        i2t,
    )


def folded_metrics(
    image: np.ndarray,
    text: np.ndarray,
    text_image: np.ndarray,
    folds: int,
    *,
    token_dim: int | None = None,
    image_queries: np.ndarray | None = None,
    text_queries: np.ndarray | None = None,
    offsets: tuple[np.ndarray, np.ndarray] | None = None,
) -> RetrievalReport:
    """The COCO "1k" protocol: metrics on ``folds`` consecutive image folds, averaged.

    Each fold holds ``N // folds`` images (a remainder is dropped) and their captions; recalls
    and median ranks are the means over folds, sizes are per fold.
    """
    queries_t = text if text_queries is None else text_queries
    queries_i = image if image_queries is None else image_queries
    size = len(image) // folds
    reports = []
    for fold in range(folds):
        lo, hi = fold * size, (fold + 1) * size
        keep = (text_image >= lo) & (text_image < hi)
        reports.append(
            retrieval_metrics(
                image[lo:hi],
                text[keep],
                text_image[keep] - lo,
                token_dim=token_dim,
                image_queries=queries_i[lo:hi],
                text_queries=queries_t[keep],
                offsets=None if offsets is None else (offsets[0][lo:hi], offsets[1][keep]),
            )
        )

    def mean(values: list[float]) -> float:
        return float(np.mean(values))

    return RetrievalReport(
        {k: mean([r.text_to_image[k] for r in reports]) for k in reports[0].text_to_image},
        {k: mean([r.image_to_text[k] for r in reports]) for k in reports[0].image_to_text},
        mean([r.median_rank_text_to_image for r in reports]),
        mean([r.median_rank_image_to_text for r in reports]),
        size,
        round(mean([r.n_texts for r in reports])),
        np.concatenate([r.ranks_text_to_image for r in reports]),
        np.concatenate([r.ranks_image_to_text for r in reports]),
    )
