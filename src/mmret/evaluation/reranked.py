"""Retrieval metrics after reranking the first stage's top N with a cross-encoder.

The first stage ranks the whole collection; its top N candidates (by score, ties in collection
order) are rescored by the cross-encoder and reordered; everything below them keeps its first
stage order. A query's rank is then its best hit's place among the reranked N (ties in the
query's favour, as in :mod:`mmret.evaluation.retrieval`), or its first-stage rank (at least
N + 1) when no hit made the top N: reranking cannot find what the first stage missed.
With a ``first_stage_weight``, the reranked score adds the first stage's score times it (a
reranker calibrated for that first stage, :class:`mmret.reranker.FirstStage`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mmret.cache.layer_features import LayerFeatureSet
from mmret.evaluation.retrieval import RetrievalReport, report_from_ranks
from mmret.heads.cross_encoder import CrossEncoder, SideTokens

#: Reads the token features of rows of the collection: ``(rows) -> SideTokens``.
SideReader = Callable[[np.ndarray], SideTokens]


@dataclass(frozen=True)
class StoredSides:
    """Sides read from a stored layer feature set: images by image row, texts by caption row."""

    features: LayerFeatureSet
    image_layer: int
    text_layer: int

    def images(self, rows: np.ndarray) -> SideTokens:
        tokens, mask = self.features.image[self.image_layer].read(rows)
        return image_side(tokens, mask, self.features.text[self.text_layer].tokens.shape[1])

    def texts(self, rows: np.ndarray) -> SideTokens:
        tokens, mask = self.features.text[self.text_layer].read(rows)
        return text_side(tokens, mask, self.features.image[self.image_layer].tokens.shape[1])


def image_side(tokens: torch.Tensor, mask: torch.Tensor, text_dim: int) -> SideTokens:
    """A side of images only from ``(B, T, D)`` image tokens and their ``(B, T)`` mask."""
    batch = len(tokens)
    empty = torch.zeros(batch, 0, text_dim)
    return SideTokens(tokens, mask, empty, torch.zeros(batch, 0, dtype=torch.bool))


def text_side(tokens: torch.Tensor, mask: torch.Tensor, image_dim: int) -> SideTokens:
    """A side of texts only from ``(B, T, D)`` text tokens and their ``(B, T)`` mask."""
    batch = len(tokens)
    empty = torch.zeros(batch, 0, image_dim)
    return SideTokens(empty, torch.zeros(batch, 0, dtype=torch.bool), tokens, mask)


def repeat_side(side: SideTokens, times: int) -> SideTokens:
    """Each of a side's ``B`` inputs ``times`` times in a row: ``B * times`` inputs."""
    return SideTokens(
        side.image.repeat_interleave(times, dim=0),
        side.image_mask.repeat_interleave(times, dim=0),
        side.text.repeat_interleave(times, dim=0),
        side.text_mask.repeat_interleave(times, dim=0),
    )


def first_stage_top(scores: np.ndarray, n: int) -> np.ndarray:
    """``(Q, min(n, C))`` column indices of the best first-stage scores, best first, ties in
    column order (a stable sort, as :func:`mmret.evaluation.ir.top_k`)."""
    order: np.ndarray = np.argsort(-scores, axis=1, kind="stable")[:, : min(n, scores.shape[1])]
    return order


def reranked_ranks(
    model: CrossEncoder,
    first_stage: np.ndarray,
    hits: Callable[[int], np.ndarray],
    queries: SideReader,
    candidates: SideReader,
    n: int,
    *,
    query_batch: int = 1,
    first_stage_weight: float = 0.0,
) -> tuple[np.ndarray, float]:
    """``(Q,)`` 1-based ranks of each query's best hit after reranking its top ``n``, and the
    seconds reranking took per query (reading features and the cross-encoder).

    ``first_stage`` ``(Q, C)`` holds the first stage's scores of every candidate; ``hits(q)``
    the candidate columns that are hits for query row ``q``; ``queries(rows)`` and
    ``candidates(columns)`` read token features. ``query_batch`` queries share one forward pass.
    The reranked score adds ``first_stage_weight`` times the first stage's.
    """
    model.eval()
    ranks = np.empty(len(first_stage), dtype=np.int64)
    top = first_stage_top(first_stage, n)
    seconds = 0.0
    for start in range(0, len(first_stage), query_batch):
        rows = np.arange(start, min(start + query_batch, len(first_stage)))
        began = time.perf_counter()
        with torch.inference_mode():
            query = repeat_side(queries(rows), top.shape[1])
            scores = model(query, candidates(top[rows].reshape(-1))).view(len(rows), -1).numpy()
        if first_stage_weight:
            scores = scores + first_stage_weight * np.take_along_axis(
                first_stage[rows], top[rows], axis=1
            )
        seconds += time.perf_counter() - began
        for offset, row in enumerate(rows):
            ranks[row] = _rank(first_stage[row], top[row], scores[offset], hits(int(row)))
    return ranks, seconds / max(len(first_stage), 1)


def _rank(first: np.ndarray, top: np.ndarray, reranked: np.ndarray, hits: np.ndarray) -> int:
    is_hit = np.isin(top, hits)
    if is_hit.any():
        return int((reranked > reranked[is_hit].max()).sum()) + 1
    best = first[hits].max()
    return max(int((first > best).sum()) + 1, len(top) + 1)


@dataclass(frozen=True)
class RerankedReport:
    """Recalls both ways after reranking the top ``n``, milliseconds per query, and the weight
    of the first stage's scores in the reranked score."""

    report: RetrievalReport
    n: int
    ms_per_query_text_to_image: float
    ms_per_query_image_to_text: float
    first_stage_weight: float = 0.0


def reranked_retrieval(
    model: CrossEncoder,
    image: np.ndarray,
    text: np.ndarray,
    text_image: np.ndarray,
    sides: StoredSides,
    n: int,
    *,
    captions: Sequence[int] | np.ndarray | None = None,
    images: Sequence[int] | np.ndarray | None = None,
    query_batch: int = 1,
    first_stage_weight: float = 0.0,
    offsets: tuple[np.ndarray, np.ndarray] | None = None,
) -> RerankedReport:
    """Image-text retrieval metrics (the standard protocol) after reranking the top ``n``.

    ``image (N, D)`` and ``text (T, D)`` are the first stage's unit vectors; ``captions`` and
    ``images`` choose the query rows (default: all), for a quicker estimate on a sample;
    ``first_stage_weight`` is the weight of their scores in the reranked score: cosines, minus
    ``offsets`` (``(N,)`` and ``(T,)`` discounts of images and texts, a query bank's) if given.
    """
    caption_rows = np.arange(len(text)) if captions is None else np.asarray(captions)
    image_rows = np.arange(len(image)) if images is None else np.asarray(images)
    owner = np.asarray(text_image)
    captions_of = [np.flatnonzero(owner == i) for i in range(len(image))]
    image_offset, text_offset = offsets if offsets is not None else (0.0, 0.0)
    t2i, t2i_s = reranked_ranks(
        model,
        text[caption_rows] @ image.T - image_offset,
        lambda q: owner[caption_rows[q : q + 1]],
        lambda rows: sides.texts(caption_rows[rows]),
        sides.images,
        n,
        query_batch=query_batch,
        first_stage_weight=first_stage_weight,
    )
    i2t, i2t_s = reranked_ranks(
        model,
        image[image_rows] @ text.T - text_offset,
        lambda q: captions_of[image_rows[q]],
        lambda rows: sides.images(image_rows[rows]),
        sides.texts,
        n,
        query_batch=query_batch,
        first_stage_weight=first_stage_weight,
    )
    report = report_from_ranks(t2i, i2t, len(image), len(text))
    return RerankedReport(report, n, 1000.0 * t2i_s, 1000.0 * i2t_s, first_stage_weight)


def stack_sides(sides: Sequence[SideTokens]) -> SideTokens:
    """One side of all the inputs of ``sides``, padded per modality to the longest."""

    def pad(parts: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        longest = max(part.shape[1] for part in parts)
        tokens = torch.zeros(sum(len(p) for p in parts), longest, parts[0].shape[2])
        mask = torch.zeros(len(tokens), longest, dtype=torch.bool)
        row = 0
        for part, part_mask in zip(parts, masks, strict=True):
            tokens[row : row + len(part), : part.shape[1]] = part
            mask[row : row + len(part), : part.shape[1]] = part_mask
            row += len(part)
        return tokens, mask

    image, image_mask = pad([s.image for s in sides], [s.image_mask for s in sides])
    text, text_mask = pad([s.text for s in sides], [s.text_mask for s in sides])
    return SideTokens(image, image_mask, text, text_mask)


def reranking_order(
    score: Callable[[SideTokens, SideTokens, np.ndarray], np.ndarray],
    queries: Callable[[int], SideTokens],
    documents: Callable[[int], SideTokens],
    first_stage: Callable[[int, np.ndarray], np.ndarray],
    n: int,
) -> Callable[[int, np.ndarray], np.ndarray]:
    """A ``reorder(q, ranked)`` for :func:`mmret.evaluation.ir.ir_metrics`: query ``q``'s top
    ``n`` ranked documents reordered by ``score(query, candidates, first_stage_scores)``, the
    rest left as they are. ``queries(q)`` and ``documents(d)`` give one input's token features,
    ``first_stage(q, documents)`` the first stage's scores of those documents for query ``q``."""

    def reorder(query: int, ranked: np.ndarray) -> np.ndarray:
        top = ranked[:n]
        candidates = stack_sides([documents(int(d)) for d in top])
        scores = score(queries(query), candidates, first_stage(query, top))
        return np.concatenate([top[np.argsort(-scores, kind="stable")], ranked[n:]])

    return reorder
