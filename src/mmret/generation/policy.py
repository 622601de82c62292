"""Which retrieved documents a generator should read: relevant, multimodal and diverse.

RA-CM3 (Yasunaga et al., ICML 2023) found that the documents handed to a generator help most
when they are (1) relevant to the input, (2) multimodal (an image with its text beats either
alone) and (3) diverse: no near-copies of each other or of the input; during training the set
is sampled from the top candidates rather than always the same best few. :func:`select`
applies those three rules to a ranked candidate list, each with its own knob:

- relevance: the first stage's score, and only the top ``candidates`` are considered;
- modality: ``"any"``, ``"prefer"`` (image+text documents get ``modality_bonus`` added to their
  relevance) or ``"require"`` (only image+text documents);
- diversity: greedy maximal marginal relevance, ``(1 - diversity) * relevance - diversity *
  (similarity to the closest document already chosen)``; a document at least
  ``duplicate_threshold`` similar to the query or to one already chosen is dropped outright;
- sampling: with ``temperature > 0`` Gumbel noise of that scale perturbs relevance, so repeated
  calls draw different good sets (seeded, reproducible).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from mmret._config import JsonConfig
from mmret.engine import SearchResult
from mmret.errors import InputError
from mmret.late_interaction import similarity

Modality = Literal["any", "prefer", "require"]
MODALITIES: tuple[Modality, ...] = ("any", "prefer", "require")


@dataclass(frozen=True)
class ContextPolicy(JsonConfig):
    """How :func:`select` picks ``k`` documents from the first stage's ``candidates``."""

    k: int = 5
    candidates: int = 50
    modality: Modality = "prefer"
    modality_bonus: float = 0.05
    diversity: float = 0.0
    duplicate_threshold: float = 0.95
    temperature: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k < 1 or self.candidates < self.k:
            raise InputError(
                f"context needs 1 <= k <= candidates, got k={self.k}, candidates={self.candidates}"
            )
        if self.modality not in MODALITIES:
            raise InputError(
                f"modality must be one of {', '.join(MODALITIES)}, got {self.modality!r}"
            )
        if not 0.0 <= self.diversity <= 1.0:
            raise InputError(f"diversity must be between 0 and 1, got {self.diversity}")
        if not 0.0 < self.duplicate_threshold <= 1.0:
            raise InputError(
                f"duplicate threshold must be in (0, 1], got {self.duplicate_threshold}"
            )
        if self.temperature < 0.0:
            raise InputError(f"temperature must not be negative, got {self.temperature}")


def normalised_similarity(
    queries: np.ndarray, documents: np.ndarray, token_dim: int | None
) -> np.ndarray:
    """``(Q, N)`` similarities on a cosine-like scale (at most 1) for any model: a
    late-interaction score is divided by the query's token count."""
    scores = similarity(queries, documents, token_dim)
    if token_dim is not None:
        scores = scores / (queries.shape[1] // token_dim)
    return scores


def select(
    query: np.ndarray,
    hits: Sequence[SearchResult],
    vectors: np.ndarray,
    policy: ContextPolicy,
    token_dim: int | None = None,
) -> list[SearchResult]:
    """Up to ``policy.k`` of ``hits`` (ranked, best first, with ``(N, dim)`` stored vectors),
    in the order chosen; ``query`` is the ``(dim,)`` query vector in the same space."""
    hits, vectors = list(hits[: policy.candidates]), vectors[: policy.candidates]
    if not hits:
        return []
    to_query = normalised_similarity(query[None, :], vectors, token_dim)[0]
    # Relevance is the first stage's score (query bank included), on the cosine-like scale of
    # the similarities it is traded against: a late-interaction sum per query token.
    tokens = 1 if token_dim is None else query.shape[0] // token_dim
    relevance = np.array([hit.score for hit in hits], dtype=np.float64) / tokens
    both = np.array([hit.image is not None and hit.text is not None for hit in hits])
    if policy.modality == "prefer":
        relevance = relevance + policy.modality_bonus * both
    if policy.temperature > 0:
        rng = np.random.default_rng(policy.seed)
        relevance = relevance + policy.temperature * rng.gumbel(size=len(relevance))
    open_ = relevance < np.inf
    if policy.modality == "require":
        open_ &= both
    open_ &= to_query < policy.duplicate_threshold
    between = normalised_similarity(vectors, vectors, token_dim)
    closest = np.full(len(hits), -np.inf)  # similarity to the nearest chosen document
    chosen: list[int] = []
    while len(chosen) < policy.k and open_.any():
        penalty = np.where(np.isfinite(closest), closest, 0.0)
        value = (1 - policy.diversity) * relevance - policy.diversity * penalty
        best = int(np.argmax(np.where(open_, value, -np.inf)))
        chosen.append(best)
        open_[best] = False
        closest = np.maximum(closest, between[best])
        open_ &= between[best] < policy.duplicate_threshold
    return [hits[i] for i in chosen]
