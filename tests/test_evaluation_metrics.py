"""Evaluation metrics on hand-made cases (ties included) and against naive references."""

from __future__ import annotations

import doctest
import math
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from mmret.encoders import fingerprint
from mmret.errors import InputError
from mmret.evaluation import classification, ir, reports, retrieval
from mmret.evaluation.classification import zero_shot_metrics
from mmret.evaluation.ir import ir_metrics, read_qrels
from mmret.evaluation.retrieval import folded_metrics, recall_curve, retrieval_metrics


@pytest.mark.parametrize("module", [retrieval, classification, ir, reports])
def test_docstring_examples(module: ModuleType) -> None:
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_retrieval_ties_count_for_the_query() -> None:
    # Every image and caption identical: all scores tie, so every query finds its hit first.
    image = np.ones((3, 2), dtype=np.float32) / np.sqrt(2)
    text = np.ones((6, 2), dtype=np.float32) / np.sqrt(2)
    report = retrieval_metrics(image, text, np.array([0, 0, 1, 1, 2, 2]))
    assert report.text_to_image == {"R@1": 100.0, "R@5": 100.0, "R@10": 100.0}
    assert report.median_rank_image_to_text == 1.0


def test_retrieval_hand_made_ranks() -> None:
    image = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    # caption 0 -> image 0 (rank 1); caption 1 -> image 1 but closest to image 0 (rank 3:
    # 0 scores 1.0, 2 scores 0.6, own scores 0.0); caption 2 ties images 1 and 2 (rank 1).
    text = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    owner = np.array([0, 1, 2])
    report = retrieval_metrics(image, text, owner)
    assert report.ranks_text_to_image.tolist() == [1, 3, 2]
    assert report.text_to_image["R@1"] == pytest.approx(100 / 3)
    assert report.median_rank_text_to_image == 2.0


def test_recall_curve_is_cumulative_and_matches_recalls() -> None:
    ranks = np.array([1, 1, 3, 7, 60, 50])
    curve = recall_curve(ranks)
    assert curve.shape == (50,) and np.all(np.diff(curve) >= 0)
    assert curve[0] == pytest.approx(100 * 2 / 6) and curve[49] == pytest.approx(100 * 5 / 6)
    assert [curve[k - 1] for k in (1, 5, 10)] == pytest.approx(
        list(retrieval.recalls(ranks).values())
    )


def test_folds_average_per_fold_metrics() -> None:
    rng = np.random.default_rng(1)
    image = rng.standard_normal((20, 4))
    owner = np.repeat(np.arange(20), 2)
    text = image[owner] + rng.standard_normal((40, 4))
    whole = [retrieval_metrics(image[:10], text[:20], owner[:20])]
    whole.append(retrieval_metrics(image[10:], text[20:], owner[20:] - 10))
    folded = folded_metrics(image, text, owner, 2)
    assert folded.n_images == 10 and folded.n_texts == 20
    expected = (whole[0].text_to_image["R@1"] + whole[1].text_to_image["R@1"]) / 2
    assert folded.text_to_image["R@1"] == pytest.approx(expected)


def test_zero_shot_ties_and_per_class() -> None:
    scores = np.array(
        [
            [0.9, 0.1, 0.0],  # class 0, right
            [0.5, 0.5, 0.0],  # class 1, tied with 0: counts as right
            [0.2, 0.3, 0.1],  # class 2, ranked last
            [0.0, 0.0, 1.0],  # class 2, right
        ]
    )
    report = zero_shot_metrics(scores, np.array([0, 1, 2, 2]), ["a", "b", "c"])
    assert report.top1 == 75.0 and report.top5 == 100.0 and report.n == 4
    assert report.per_class == {"a": 100.0, "b": 100.0, "c": 50.0}
    assert report.confusion.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    assert np.trace(report.confusion) / report.n * 100 == report.top1


def test_zero_shot_top5_and_empty_class() -> None:
    scores = np.tile(np.arange(8, dtype=float), (2, 1))  # class 7 always best
    report = zero_shot_metrics(scores, np.array([2, 3]), [str(c) for c in range(8)])
    assert report.top1 == 0.0 and report.top5 == 50.0  # class 3 is 5th, class 2 is 6th
    assert math.isnan(report.per_class["0"])


def naive_ir(
    query: np.ndarray, docs: np.ndarray, qrels: dict[int, dict[int, int]]
) -> dict[str, float]:
    """Sort with Python, first index wins ties; textbook formulas."""
    hits = {1: 0, 5: 0, 10: 0}
    rr, ndcg = 0.0, 0.0
    for q, judged in qrels.items():
        scores = [float(np.dot(query[q], d)) for d in docs]
        order = sorted(range(len(docs)), key=lambda d: (-scores[d], d))
        grades = [judged.get(d, 0) for d in order]
        for k in hits:
            hits[k] += any(g > 0 for g in grades[:k])
        first = next((i for i, g in enumerate(grades[:10]) if g > 0), None)
        rr += 0.0 if first is None else 1.0 / (first + 1)
        dcg = sum(g / math.log2(i + 2) for i, g in enumerate(grades[:10]))
        best = sorted(judged.values(), reverse=True)[:10]
        ndcg += dcg / sum(g / math.log2(i + 2) for i, g in enumerate(best))
    n = len(qrels)
    return {
        **{f"R@{k}": 100 * h / n for k, h in hits.items()},
        "MRR": 100 * rr / n,
        "nDCG": 100 * ndcg / n,
    }


def test_ir_matches_naive_reference_with_ties_and_grades() -> None:
    rng = np.random.default_rng(3)
    docs = np.round(rng.standard_normal((60, 4)), 1)  # coarse values: many exact ties
    docs[10] = docs[11]
    query = np.round(rng.standard_normal((25, 4)), 1)
    qrels = {
        q: {
            int(d): int(g)
            for d, g in zip(rng.choice(60, 3, replace=False), rng.integers(1, 4, 3), strict=True)
        }
        for q in range(25)
    }
    qrels[0] = {10: 1, 11: 2}  # tied documents with different grades
    expected = naive_ir(query, docs, qrels)
    report = ir_metrics(
        query,
        docs,
        [f"q{q}" for q in range(25)],
        [f"d{d}" for d in range(60)],
        {f"q{q}": {f"d{d}": g for d, g in judged.items()} for q, judged in qrels.items()},
    )
    assert report.recall == pytest.approx({k: expected[k] for k in ("R@1", "R@5", "R@10")})
    assert report.mrr == pytest.approx(expected["MRR"])
    assert report.ndcg == pytest.approx(expected["nDCG"])
    assert report.n_queries == 25 and report.n_docs == 60


def test_ir_skips_unjudged_queries_and_scores_perfect_runs() -> None:
    vectors = np.eye(4)
    qrels = {"a": {"A": 2}, "b": {"B": 1, "C": 0}, "z": {"A": 0}}
    report = ir_metrics(vectors[:3], vectors, ["a", "b", "c"], ["A", "B", "C", "D"], qrels)
    assert report.n_queries == 2
    assert report.recall["R@1"] == report.mrr == report.ndcg == 100.0
    with pytest.raises(InputError, match="no query has a relevant"):
        ir_metrics(vectors, vectors, ["x"] * 4, ["A", "B", "C", "D"], qrels)


@pytest.mark.parametrize(
    "text",
    [
        "q1 0 d1 2\nq1 0 d2 1\nq2 0 d3 1\n",  # TREC
        "query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td2\t1\nq2\td3\t1\n",  # BEIR
        "q1 d1 2\n\nq1 d2 1\nq2 d3 1\n",  # 3 columns, no header
    ],
)
def test_read_qrels_formats(tmp_path: Path, text: str) -> None:
    path = tmp_path / "qrels.tsv"
    path.write_text(text)
    assert read_qrels(path) == {"q1": {"d1": 2, "d2": 1}, "q2": {"d3": 1}}


def test_read_qrels_errors(tmp_path: Path) -> None:
    path = tmp_path / "qrels.tsv"
    path.write_text("q1 0 d1 1\nq1 0 d2 high\n")
    with pytest.raises(InputError, match=r"qrels.tsv:2: relevance 'high'"):
        read_qrels(path)
    path.write_text("q1 d1\n")
    with pytest.raises(InputError, match=r"qrels\.tsv:1: expected"):
        read_qrels(path)


def test_markdown_table_escapes_pipes() -> None:
    rows = (("a|b", "1.0", "x"), ("c", "-", "y"))
    table = reports.MetricTable("T", ("name", "value", "text"), rows, ("note", "more"))
    assert table.to_markdown() == (
        "### T\n\n| name | value | text |\n|---|---:|---|\n| a\\|b | 1.0 | x |\n"
        "| c | - | y |\n\nnote\n\nmore\n"
    )


def test_cache_key_of_a_bare_spec_follows_its_shipped_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "mine").mkdir()
    weights = tmp_path / "mine" / "model.safetensors"
    weights.write_bytes(b"first")
    monkeypatch.setattr(fingerprint, "WEIGHTS", tmp_path)
    before = fingerprint.spec_fingerprint("mine")
    weights.write_bytes(b"retrained")
    assert fingerprint.spec_fingerprint("mine") != before
    assert fingerprint.spec_fingerprint("hashing") == fingerprint.spec_fingerprint("hashing")
