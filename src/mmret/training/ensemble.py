"""Choosing an ensemble's weights (``mmret train ensemble``): every mixture on a grid of the
simplex is scored on dev image-text retrieval, from each member's cached dev embeddings, and the
best RSUM wins (see :mod:`mmret.encoders.ensemble`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from mmret.cache.embeddings import PairEmbeddings
from mmret.encoders.ensemble import EnsembleConfig
from mmret.errors import InputError
from mmret.evaluation.retrieval import retrieval_metrics


def mixtures(members: int, step: float) -> Iterator[tuple[float, ...]]:
    """Every weight vector of ``members`` positive multiples of ``step`` summing to 1."""
    parts = round(1 / step)
    if parts < members or abs(parts * step - 1) > 1e-9:
        raise InputError(f"--step {step:g} must divide 1 into at least {members} parts")

    def split(total: int, count: int) -> Iterator[tuple[int, ...]]:
        if count == 1:
            yield (total,)
            return
        for first in range(1, total - count + 2):
            for rest in split(total - first, count - 1):
                yield (first, *rest)

    for counts in split(parts, members):
        yield tuple(round(count / parts, 10) for count in counts)


def mixed(embeddings: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """The ensemble's vectors from the members' unit vectors: ``sqrt(w_i) * v_i`` side by side."""
    return np.concatenate(
        [part * np.float32(weight**0.5) for part, weight in zip(embeddings, weights, strict=True)],
        axis=1,
    )


def choose_weights(
    members: Sequence[str], dev: Sequence[PairEmbeddings], *, step: float = 0.05
) -> EnsembleConfig:
    """The members' mixture (on a ``step`` grid) whose dev retrieval RSUM is best; the record
    holds every mixture's RSUM and each member's alone."""
    first = dev[0]
    for name, other in zip(members[1:], dev[1:], strict=True):
        if not np.array_equal(other.text_image, first.text_image):
            raise InputError(f"{name} and {members[0]} did not embed the same dev pairs")
    alone = {
        name: round(retrieval_metrics(d.image, d.text, d.text_image).rsum, 2)
        for name, d in zip(members, dev, strict=True)
    }
    by_mixture: dict[str, float] = {}
    best: tuple[float, tuple[float, ...]] | None = None
    for weights in mixtures(len(members), step):
        image = mixed([d.image for d in dev], weights)
        text = mixed([d.text for d in dev], weights)
        rsum = retrieval_metrics(image, text, first.text_image).rsum
        by_mixture[", ".join(f"{w:g}" for w in weights)] = round(rsum, 2)
        if best is None or rsum > best[0]:
            best = (rsum, weights)
    assert best is not None  # mixtures() yields at least one
    record = {"dev_rsum_alone": alone, "dev_rsum": by_mixture, "step": step}
    return EnsembleConfig(tuple(members), best[1], record)
