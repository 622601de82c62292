"""Zero-shot classification: class names become prompts, images take the closest class.

Each class is embedded as the mean of its unit-norm prompt embeddings, one per template,
renormalised (CLIP's prompt ensembling). An image's rank for its true class counts the classes
scoring strictly higher, so ties are broken in the image's favour, as in
:mod:`mmret.evaluation.retrieval`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmret.encoders.base import Encoder
from mmret.errors import InputError
from mmret.ingest.report import SkipReport
from mmret.ingest.sources import read_records
from mmret.late_interaction import l2_normalise, similarity

#: The default prompt ensemble: generic photo prompts, plus small and low-resolution variants
#: because benchmark images (CIFAR, thumbnails) often are.
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a good photo of a {}.",
    "a close-up photo of a {}.",
    "a blurry photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
)


@dataclass(frozen=True)
class LabelledImages:
    """Image files with ``labels (N,)`` indexing ``classes`` (folder names, ``_`` as spaces)."""

    paths: list[Path]
    labels: np.ndarray
    classes: list[str]


def read_class_folders(folder: Path, report: SkipReport | None = None) -> LabelledImages:
    """Images under ``folder/CLASS/`` (any depth below it); images directly in ``folder`` are
    skipped and recorded in ``report``."""
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    report = report if report is not None else SkipReport()
    found: list[tuple[str, Path]] = []
    for record in read_records(folder, report):
        parent = record.metadata.get("folder")
        if record.image is None or not isinstance(parent, str):
            report.skip(f"{record.id}: not inside a class folder")
            continue
        found.append((parent.split("/")[0], record.image))
    names = sorted({name for name, _ in found})
    if len(names) < 2:
        raise InputError(f"{folder}: zero-shot needs at least two class sub-folders with images")
    index = {name: i for i, name in enumerate(names)}
    return LabelledImages(
        [path for _, path in found],
        np.asarray([index[name] for name, _ in found], dtype=np.int64),
        [name.replace("_", " ") for name in names],
    )


def class_prompts(classes: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every template filled with every class name, class by class."""
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise InputError(f"each template needs exactly one '{{}}' for the class name, got {bad}")
    return [template.format(name) for name in classes for template in templates]


def class_embeddings(
    encoder: Encoder, classes: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES
) -> np.ndarray:
    """``(C, D)`` unit vectors: per class, the renormalised mean of its prompt embeddings."""
    prompts = class_prompts(classes, templates)
    text = encoder.encode_texts(prompts).reshape(len(classes), len(templates), -1)
    return l2_normalise(text.mean(axis=1))


def class_scores(
    encoder: Encoder,
    image: np.ndarray,
    classes: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
) -> np.ndarray:
    """``(N, C)`` scores of ``(N, D)`` image embeddings (from ``encoder.for_queries()``) for
    each class: the cosine with :func:`class_embeddings` for a single-vector encoder; for a
    multi-vector one, the MaxSim against each prompt's token set, averaged over the templates
    (token sets have no meaningful mean)."""
    if encoder.token_dim is None:
        product: np.ndarray = image @ class_embeddings(encoder, classes, templates).T
        return product
    prompts = class_prompts(classes, templates)
    scores = similarity(image, encoder.encode_texts(prompts), encoder.token_dim)
    mean: np.ndarray = scores.reshape(len(image), len(classes), len(templates)).mean(axis=2)
    return mean


def true_class_ranks(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``(N,)`` 1-based rank of each true class in ``(N, C)`` scores (ties in its favour).

    >>> scores = np.array([[0.9, 0.1, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.1]])
    >>> true_class_ranks(scores, np.array([0, 1, 2])).tolist()
    [1, 1, 3]
    """
    own = scores[np.arange(len(scores)), labels]
    ranks: np.ndarray = (scores > own[:, None]).sum(axis=1) + 1
    return ranks


def predictions(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``(N,)`` top-1 classes of ``(N, C)`` scores, a tie with the true class going to it
    (so the confusion matrix's diagonal agrees with top-1 accuracy).

    >>> predictions(np.array([[0.5, 0.5], [0.5, 0.5], [0.1, 0.2]]), np.array([1, 0, 0])).tolist()
    [1, 0, 1]
    """
    own = scores[np.arange(len(scores)), labels]
    chosen: np.ndarray = np.where(own >= scores.max(axis=1), labels, scores.argmax(axis=1))
    return chosen


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """``(C, C)`` counts: row = true class, column = predicted class.

    >>> confusion_matrix(np.array([0, 0, 1]), np.array([0, 1, 1]), 2).tolist()
    [[1, 1], [0, 1]]
    """
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


@dataclass(frozen=True)
class ZeroShotReport:
    """Top-1/top-5 accuracy (percent), per-class accuracy and the ``(C, C)`` confusion counts."""

    top1: float
    top5: float
    per_class: dict[str, float]
    confusion: np.ndarray
    n: int

    @property
    def classes(self) -> list[str]:
        return list(self.per_class)


def zero_shot_metrics(
    scores: np.ndarray, labels: np.ndarray, classes: Sequence[str]
) -> ZeroShotReport:
    """Metrics of ``(N, C)`` image-class scores against ``(N,)`` true labels.

    Top-5 is top-min(5, C); per-class accuracy is top-1 within each class (NaN when a class
    has no image).

    >>> report = zero_shot_metrics(np.eye(3)[[0, 1, 1]], np.array([0, 1, 2]), ["a", "b", "c"])
    >>> round(report.top1, 1), report.top5, report.per_class["c"]
    (66.7, 100.0, 0.0)
    """
    ranks = true_class_ranks(scores, labels)
    matrix = confusion_matrix(labels, predictions(scores, labels), len(classes))
    totals = matrix.sum(axis=1)
    per_class = {
        name: float(100.0 * matrix[i, i] / totals[i]) if totals[i] else float("nan")
        for i, name in enumerate(classes)
    }
    return ZeroShotReport(
        float(100.0 * np.mean(ranks <= 1)),
        float(100.0 * np.mean(ranks <= 5)),
        per_class,
        matrix,
        len(labels),
    )
