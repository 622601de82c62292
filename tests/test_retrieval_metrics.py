"""Retrieval metrics against an independent, deliberately naive implementation."""

from __future__ import annotations

import numpy as np

from mmret.evaluation.retrieval import retrieval_metrics


def naive(image: np.ndarray, text: np.ndarray, owner: np.ndarray) -> dict[str, list[float]]:
    t2i, i2t = [], []
    for t in range(len(text)):
        scores = [float(text[t] @ image[i]) for i in range(len(image))]
        ranking = sorted(range(len(image)), key=lambda i: -scores[i])
        # ties broken in the query's favour: own image first among equals
        ranking = sorted(ranking, key=lambda i: (-scores[i], i != owner[t]))
        t2i.append(ranking.index(owner[t]) + 1)
    for i in range(len(image)):
        scores = [float(image[i] @ text[t]) for t in range(len(text))]
        ranking = sorted(range(len(text)), key=lambda t: (-scores[t], owner[t] != i))
        i2t.append(min(ranking.index(t) for t in range(len(text)) if owner[t] == i) + 1)
    return {"t2i": t2i, "i2t": i2t}


def test_matches_naive_reference() -> None:
    rng = np.random.default_rng(0)
    image = rng.standard_normal((40, 8)).astype(np.float32)
    owner = np.repeat(np.arange(40), 5)
    text = (image[owner] + 1.5 * rng.standard_normal((200, 8))).astype(np.float32)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    report = retrieval_metrics(image, text, owner)
    ranks = naive(image, text, owner)
    for k in (1, 5, 10):
        assert report.text_to_image[f"R@{k}"] == 100 * np.mean(np.array(ranks["t2i"]) <= k)
        assert report.image_to_text[f"R@{k}"] == 100 * np.mean(np.array(ranks["i2t"]) <= k)
    assert report.median_rank_text_to_image == np.median(ranks["t2i"])
    assert report.median_rank_image_to_text == np.median(ranks["i2t"])
    assert 0 < report.text_to_image["R@1"] < report.text_to_image["R@10"] < 100
    assert report.rsum == sum(report.text_to_image.values()) + sum(report.image_to_text.values())


def test_perfect_embeddings_score_100() -> None:
    image = np.eye(6, dtype=np.float32)
    owner = np.array([0, 0, 1, 2, 3, 4, 5])
    report = retrieval_metrics(image, image[owner], owner)
    assert report.text_to_image == {"R@1": 100.0, "R@5": 100.0, "R@10": 100.0}
    assert report.image_to_text["R@1"] == 100.0 and report.n_texts == 7
