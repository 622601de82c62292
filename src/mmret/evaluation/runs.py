"""Evaluation runs: a model measured on a set, returned as a report object the CLI prints.

:func:`evaluate_zeroshot` classifies labelled images zero-shot (``mmret eval zeroshot``).

:func:`evaluate_retrieval` scores image-text retrieval the way a search of an index of the set
would rank it (``mmret eval retrieval``; ``tests/test_query_path.py`` holds the two to the same
ranks): items embedded by the encoder and refined by its memory if any, queries by the query
side (ReT's differs), scores normalised with the query bank, and optionally reranked.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmret.cache.embeddings import PairEmbeddings, embed_images, embed_pairs
from mmret.cache.layer_features import layer_feature_set
from mmret.encoders.base import Encoder
from mmret.errors import InputError
from mmret.evaluation.classification import (
    DEFAULT_TEMPLATES,
    LabelledImages,
    ZeroShotReport,
    class_scores,
    zero_shot_metrics,
)
from mmret.evaluation.reranked import RerankedReport, StoredSides, reranked_retrieval
from mmret.evaluation.retrieval import RetrievalReport, folded_metrics, retrieval_metrics
from mmret.ingest.pairs import PairSet
from mmret.ingest.report import SkipReport
from mmret.query_bank import QueryBank
from mmret.reranker import first_stage_name, load_reranker

if TYPE_CHECKING:
    from mmret.memory.refine import Refiner


@dataclass(frozen=True)
class RetrievalRun:
    """What :func:`evaluate_retrieval` measured: the first stage's recalls (per fold, averaged,
    with ``folds`` > 1), the recalls after reranking each depth asked for, the model's label,
    its query bank, and the seconds spent encoding and scoring."""

    metrics: RetrievalReport
    reranked: list[RerankedReport]
    model: str
    bank: QueryBank | None
    #: The memory's record (:meth:`~mmret.memory.refine.Refiner.record`), if refined.
    memory: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The JSON record of ``mmret eval retrieval --json`` (without the run's total time)."""
        metrics = self.metrics
        return {
            "text_to_image": rounded_percentages(metrics.text_to_image),
            "image_to_text": rounded_percentages(metrics.image_to_text),
            "rsum": round(metrics.rsum, 4),
            **({"reranked": [_reranked_record(r) for r in self.reranked]} if self.reranked else {}),
            "n_images": metrics.n_images,
            "n_texts": metrics.n_texts,
            "model": self.model,
            **({"memory": self.memory} if self.memory else {}),
            **({"query_bank": _bank_record(self.bank)} if self.bank else {}),
        }


def evaluate_retrieval(
    pairs: PairSet,
    encoder: Encoder,
    *,
    refiner: Refiner | None = None,
    bank: QueryBank | None = None,
    folds: int = 1,
    rerank: Sequence[int] = (),
    reranker: Path | None = None,
    cache_dir: Path | None = None,
    report: SkipReport | None = None,
    show_progress: bool = False,
) -> RetrievalRun:
    """Recall@1/5/10 both ways of ``encoder`` on ``pairs`` (embeddings cached in ``cache_dir``),
    refined by ``refiner``'s memory and normalised with ``bank`` if given, averaged over
    ``folds`` image folds, and after reranking the top N for each N in ``rerank`` with the
    cross-encoder in ``reranker`` (default: the shipped one)."""
    report = report if report is not None else SkipReport()
    if folds > len(pairs.images):
        raise InputError(f"--folds {folds}: more folds than the {len(pairs.images)} images")
    if folds > 1 and rerank:
        raise InputError("--rerank scores the whole set: it cannot be combined with --folds")
    if refiner is not None:
        refiner.check_encoder(encoder.spec)
    encoding = time.perf_counter()

    def embedded(by: Encoder) -> PairEmbeddings:
        return embed_pairs(
            by, pairs, cache_dir=cache_dir, report=report, show_progress=show_progress
        )

    embeddings = refined(refiner, embedded(encoder))
    queries = embeddings
    if encoder.for_queries() is not encoder:  # separate query and document sides (ReT)
        queries = embedded(encoder.for_queries())
    encode_s = time.perf_counter() - encoding
    scoring = time.perf_counter()
    arrays = (embeddings.image, embeddings.text, embeddings.text_image)
    offsets = bank.offsets(embeddings.image, embeddings.text) if bank else None
    if folds > 1:
        metrics = folded_metrics(
            *arrays,
            folds,
            token_dim=encoder.token_dim,
            image_queries=queries.image,
            text_queries=queries.text,
            offsets=offsets,
        )
    else:
        metrics = retrieval_metrics(
            *arrays,
            token_dim=encoder.token_dim,
            image_queries=queries.image,
            text_queries=queries.text,
            offsets=offsets,
        )
    score_s = time.perf_counter() - scoring
    ranker = first_stage_name(
        encoder.spec, refined=refiner is not None, query_bank=bank is not None
    )
    reranked = (
        _rerank(pairs, arrays, offsets, ranker, rerank, reranker, cache_dir, report)
        if rerank
        else []
    )
    label = model_label(encoder.spec, refiner) + (" + query bank" if bank else "")
    memory = refiner.record() if refiner is not None else None
    seconds = {"embeddings": encode_s, "metrics": score_s}
    return RetrievalRun(metrics, reranked, label, bank, memory, seconds)


@dataclass(frozen=True)
class ZeroShotRun:
    """What :func:`evaluate_zeroshot` measured, with the model's label, the prompts' templates,
    the memory's record if refined, and the seconds spent embedding and scoring."""

    metrics: ZeroShotReport
    classes: tuple[str, ...]
    model: str
    templates: tuple[str, ...]
    memory: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The JSON record of ``mmret eval zeroshot --json`` (without the run's total time)."""
        return {
            "top1": round(self.metrics.top1, 4),
            "top5": round(self.metrics.top5, 4),
            "n": self.metrics.n,
            "classes": len(self.classes),
            "model": self.model,
            **({"memory": self.memory} if self.memory else {}),
        }


def evaluate_zeroshot(
    data: LabelledImages,
    encoder: Encoder,
    *,
    refiner: Refiner | None = None,
    templates: Sequence[str] = (),
    cache_dir: Path | None = None,
    report: SkipReport | None = None,
    show_progress: bool = False,
    source: str = "the data",
) -> ZeroShotRun:
    """Zero-shot classification of ``data``'s images by ``encoder`` (the query side: an image
    asks which class prompt it matches), each class scored by the mean of its prompts from
    ``templates`` (default :data:`~mmret.evaluation.classification.DEFAULT_TEMPLATES`);
    with ``refiner``, images and each prompt are refined by its memory (as RECO does).
    ``source`` names the images in errors."""
    encoding = time.perf_counter()
    image, ok = embed_images(
        encoder.for_queries(),
        data.paths,
        cache_dir=cache_dir,
        report=report,
        show_progress=show_progress,
    )
    if not ok.any():
        raise InputError(f"{source}: no image could be decoded")
    prompts = tuple(templates) or DEFAULT_TEMPLATES
    label = model_label(encoder.spec, refiner)
    if refiner is not None:  # each prompt is refined before the ensemble mean, as RECO does
        image[ok] = refiner.refine(image[ok], "image")
        encoder = refiner.wrap(encoder)
    scores = class_scores(encoder, image[ok], data.classes, prompts)
    encode_s = time.perf_counter() - encoding
    metrics = zero_shot_metrics(scores, data.labels[ok], data.classes)
    memory = refiner.record() if refiner is not None else None
    seconds = {"embeddings": encode_s}
    return ZeroShotRun(metrics, tuple(data.classes), label, prompts, memory, seconds)


def model_label(spec: str, refiner: Refiner | None) -> str:
    """The model column of a report: the encoder, and the memory with its options if any."""
    return spec if refiner is None else f"{spec} + {refiner.label()}"


def refined(refiner: Refiner | None, embeddings: PairEmbeddings) -> PairEmbeddings:
    """Both sides of an evaluation set refined (RECO refines queries and collection alike)."""
    if refiner is None:
        return embeddings
    return PairEmbeddings(
        refiner.refine(embeddings.image, "image"),
        refiner.refine(embeddings.text, "text"),
        embeddings.text_image,
    )


def _rerank(
    pairs: PairSet,
    arrays: tuple[np.ndarray, np.ndarray, np.ndarray],
    offsets: tuple[np.ndarray, np.ndarray] | None,
    first_stage_model: str,
    sizes: Sequence[int],
    folder: Path | None,
    cache_dir: Path | None,
    report: SkipReport,
) -> list[RerankedReport]:
    """Recalls after reranking the top N for each N in ``sizes``, from stored token features
    (extracted once into the layer feature store), with the weight of the first stage's
    scores that the reranker was calibrated with for ``first_stage_model`` (if any); the first
    stage's scores are the cosines minus ``offsets`` (a query bank's discounts) if given."""
    model = load_reranker(folder)
    config = model.model.config
    features = layer_feature_set(
        pairs,
        model.backbone,
        [config.image_layer],
        [config.text_layer],
        cache_dir=cache_dir / "layers" if cache_dir else None,
        report=report,
        show_progress=True,
    )
    if len(features.image_ids) != len(arrays[0]):
        raise InputError("the first stage and the token features kept different images")
    sides = StoredSides(features, config.image_layer, config.text_layer)
    weight = model.first_stage_weight(first_stage_model)
    return [
        reranked_retrieval(
            model.model, *arrays, sides, n, first_stage_weight=weight, offsets=offsets
        )
        for n in sorted(set(sizes))
    ]


def _bank_record(bank: QueryBank) -> dict[str, float]:
    return {"beta": bank.beta, "weight": bank.weight}


def rounded_percentages(values: dict[str, float]) -> dict[str, float]:
    """Percentages to 4 decimals for JSON (float noise such as 71.89999999999999 hides the
    number)."""
    return {name: round(value, 4) for name, value in values.items()}


def _reranked_record(reranked: RerankedReport) -> dict[str, Any]:
    metrics = reranked.report
    return {
        "n": reranked.n,
        "first_stage_weight": reranked.first_stage_weight,
        "text_to_image": rounded_percentages(metrics.text_to_image),
        "image_to_text": rounded_percentages(metrics.image_to_text),
        "rsum": round(metrics.rsum, 4),
        "ms_per_query": {
            "text_to_image": round(reranked.ms_per_query_text_to_image, 3),
            "image_to_text": round(reranked.ms_per_query_image_to_text, 3),
        },
    }
