"""Building a query bank (``mmret train query-bank``): bank vectors drawn from a training set,
``beta`` and ``weight`` chosen on dev data (see :mod:`mmret.query_bank`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mmret.cache.embeddings import PairEmbeddings, encode_image_files
from mmret.encoders import Encoder
from mmret.evaluation.retrieval import retrieval_metrics
from mmret.ingest.pairs import PairSet
from mmret.ingest.report import SkipReport
from mmret.query_bank import QueryBank

BETAS = (10.0, 20.0, 30.0)
#: Discount weights tried; 0 (no discount) wins where normalising does not help.
WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def build_query_bank(
    encoder: Encoder,
    train: PairSet,
    dev: PairEmbeddings,
    *,
    texts: int = 4000,
    images: int = 2000,
    seed: int = 0,
    report: SkipReport | None = None,
    show_progress: bool = False,
) -> QueryBank:
    """A bank of ``texts`` captions and ``images`` images of ``train`` (drawn with ``seed``,
    embedded by ``encoder``), with the ``beta`` and ``weight`` whose normalised scores give
    ``dev`` (its embeddings by the same encoder) the best RSUM, image-text retrieval both
    ways; the record keeps every setting's RSUM. Images that fail to decode are left out."""
    rng = np.random.default_rng(seed)
    text_rows = np.sort(rng.choice(len(train.texts), min(texts, len(train.texts)), replace=False))
    image_rows = np.sort(
        rng.choice(len(train.images), min(images, len(train.images)), replace=False)
    )
    text_bank = encoder.encode_texts(
        [train.texts[i] for i in text_rows], show_progress=show_progress
    )
    image_bank, ok = encode_image_files(
        encoder,
        [train.images[i] for i in image_rows],
        report if report is not None else SkipReport(),
        show_progress=show_progress,
    )
    return choose_settings(encoder.spec, text_bank, image_bank[ok], dev, seed=seed)


def choose_settings(
    encoder: str,
    text_bank: np.ndarray,
    image_bank: np.ndarray,
    dev: PairEmbeddings,
    *,
    seed: int = 0,
    betas: Sequence[float] = BETAS,
    weights: Sequence[float] = WEIGHTS,
) -> QueryBank:
    """The bank of ``text_bank`` and ``image_bank`` vectors with the ``beta`` (of ``betas``)
    and ``weight`` (of ``weights``) that give ``dev`` the best RSUM."""
    rsums: dict[str, float] = {}
    best: tuple[float, float, float] | None = None
    for beta in betas:
        # A discount is its weight times a log-mean-exp that depends on beta alone.
        image_unit, text_unit = QueryBank(encoder, text_bank, image_bank, beta, 1.0).offsets(
            dev.image, dev.text
        )
        for weight in weights:
            if weight == 0 and beta != betas[0]:
                continue  # no discount: beta does not matter
            offsets = (weight * image_unit, weight * text_unit) if weight else None
            rsum = retrieval_metrics(dev.image, dev.text, dev.text_image, offsets=offsets).rsum
            rsums[f"beta {beta:g}, weight {weight:g}"] = round(rsum, 2)
            if best is None or rsum > best[0]:
                best = (rsum, beta, weight)
    assert best is not None
    record = {"texts": len(text_bank), "images": len(image_bank), "seed": seed, "dev_rsum": rsums}
    return QueryBank(encoder, text_bank, image_bank, best[1], best[2], record)
