"""Calibrating the weight of the first stage's scores in the reranked score, on a dev sample."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from mmret.evaluation.reranked import first_stage_top, repeat_side
from mmret.heads.cross_encoder import CrossEncoder, SideTokens
from mmret.training.cross_encoder_data import RerankData, spans

#: The interpolation weights (of the bi-encoder's cosine, or of another first stage's score)
#: that dev calibration chooses from; the first best wins.
INTERPOLATION_WEIGHTS = (0.0, 5.0, 10.0, 15.0, 20.0, 30.0, 50.0)


#: One direction's top candidates per query: ``(Q, n)`` reranker scores, ``(Q, n)`` first-stage
#: scores and ``(Q, n)`` whether each candidate is a hit.
CandidateScores = tuple[np.ndarray, np.ndarray, np.ndarray]


def calibrate_cosine_weight(
    model: CrossEncoder,
    dev: RerankData,
    image: np.ndarray,
    text: np.ndarray,
    captions: np.ndarray,
    images: np.ndarray,
    n: int,
) -> float:
    """The weight of :data:`INTERPOLATION_WEIGHTS` whose reranked top ``n`` scores best on the
    dev sample (the sum of R@1, R@5 and R@10 both ways for the query rows ``captions`` and
    ``images``), the bi-encoder's ``(N, E)`` ``image`` and ``(T, E)`` ``text`` vectors being
    the first stage. The cross-encoder scores each query's ``n`` candidates once; only the
    interpolation ``cross + weight * cosine`` changes with the weight."""
    first_stage = (text[captions] @ image.T, image[images] @ text.T)
    directions = candidate_scores(model.cross_score, dev, *first_stage, captions, images, n)
    return best_weight(directions)


def best_weight(directions: list[CandidateScores]) -> float:
    """The weight of :data:`INTERPOLATION_WEIGHTS` with the best :func:`interpolation_quality`."""
    return max(INTERPOLATION_WEIGHTS, key=lambda weight: interpolation_quality(directions, weight))


def calibrate_first_stage_weight(
    model: CrossEncoder,
    dev: RerankData,
    text_to_image: np.ndarray,
    image_to_text: np.ndarray,
    captions: np.ndarray,
    images: np.ndarray,
    n: int,
) -> tuple[float, dict[float, float]]:
    """The weight of :data:`INTERPOLATION_WEIGHTS` for another first stage's scores
    (``(len(captions), N)`` ``text_to_image`` and ``(len(images), T)`` ``image_to_text``, the
    first stage of an index built with another model) in ``match score + weight * first-stage
    score`` whose reranked top ``n`` scores best on the dev sample, and the sum of R@1/5/10
    both ways (in percent) that each weight gives."""
    directions = candidate_scores(model, dev, text_to_image, image_to_text, captions, images, n)
    quality = {w: interpolation_quality(directions, w) for w in INTERPOLATION_WEIGHTS}
    best = max(quality, key=quality.__getitem__)  # the first best, as best_weight
    return best, {w: 100 * recall_sum for w, (recall_sum, _) in quality.items()}


def candidate_scores(
    score: Callable[[SideTokens, SideTokens], torch.Tensor],
    dev: RerankData,
    text_to_image: np.ndarray,
    image_to_text: np.ndarray,
    captions: np.ndarray,
    images: np.ndarray,
    n: int,
) -> list[CandidateScores]:
    """Both directions' top ``n`` candidates by the first-stage scores (``text_to_image`` for
    caption rows ``captions``, ``image_to_text`` for image rows ``images``), each scored once
    by ``score(queries, candidates)``."""
    directions = [
        (text_to_image, dev.text_side(captions), dev.image_side, dev.owner[captions]),
        (image_to_text, dev.image_side(images), dev.text_side, None),
    ]
    parts = []
    for first_stage, queries, candidates, owners in directions:
        top = first_stage_top(first_stage, n)
        hits = (
            top == owners[:, None]
            if owners is not None
            else np.stack(
                [np.isin(r, dev.captions_of[i]) for r, i in zip(top, images, strict=True)]
            )
        )
        with torch.inference_mode():
            scored = torch.cat(
                [
                    score(
                        repeat_side(queries.take(list(range(s, e))), top.shape[1]),
                        candidates(top[s:e].reshape(-1)),
                    )
                    for s, e in spans(len(top), 16)
                ]
            ).view(top.shape)
        parts.append((scored.numpy(), np.take_along_axis(first_stage, top, axis=1), hits))
    return parts


def interpolation_quality(directions: list[CandidateScores], weight: float) -> tuple[float, float]:
    """The sum of R@1, R@5 and R@10 (fractions) over ``directions`` when candidates are
    ranked by ``score + weight * first-stage score``, and the sum of mean reciprocal ranks
    (the tie-breaker). A hit tied with a miss counts below it, so a weight that makes scores
    tie (a constant reranker with weight 0) never wins for its ties."""
    recall_sum, reciprocal = 0.0, 0.0
    for score, first_stage, hits in directions:
        scores = score + weight * first_stage
        best_hit = np.where(hits, scores, -np.inf).max(axis=1, keepdims=True)
        beaten_by = (np.where(hits, -np.inf, scores) >= best_hit).sum(axis=1)
        ranks = np.where(hits.any(axis=1), beaten_by + 1, np.inf)
        recall_sum += sum(float((ranks <= k).mean()) for k in (1, 5, 10))
        reciprocal += float((1.0 / ranks).mean())
    return recall_sum, reciprocal
