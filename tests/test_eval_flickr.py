"""``mmret eval retrieval`` with the starter model on real Flickr8k dev data, checked against a
brute-force double loop over embeddings computed separately through the public encoder API."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from mmret.cli.main import app
from mmret.encoders import DEFAULT_MODEL, load_encoder
from mmret.evaluation.retrieval import retrieval_metrics
from mmret.query_bank import shipped_query_bank

FLICKR = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"
SAMPLE = 50

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    if not (FLICKR / "dev.jsonl").is_file():
        pytest.skip(f"needs Flickr8k dev at {FLICKR} (see ../shared/data)")
    rows = [json.loads(line) for line in (FLICKR / "dev.jsonl").read_text().splitlines()]
    rows = rows[:SAMPLE]
    for row in rows:
        row["image"] = str(FLICKR / str(row["image"]))
    path = tmp_path_factory.mktemp("flickr") / "sample.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path, rows


def brute_force_ranks(
    image: np.ndarray,
    text: np.ndarray,
    owner: list[int],
    image_discount: list[float],
    text_discount: list[float],
) -> tuple[list[int], list[int]]:
    """Rank every candidate for every query with Python loops (its dot product minus its
    discount); the hit wins ties."""
    t2i = []
    for t in range(len(text)):
        scores = [
            float(np.dot(text[t].astype(np.float64), image[i])) - image_discount[i]
            for i in range(len(image))
        ]
        order = sorted(range(len(image)), key=lambda i: (-scores[i], i != owner[t]))
        t2i.append(order.index(owner[t]) + 1)
    i2t = []
    for i in range(len(image)):
        scores = [
            float(np.dot(image[i].astype(np.float64), text[t])) - text_discount[t]
            for t in range(len(text))
        ]
        order = sorted(range(len(text)), key=lambda t: (-scores[t], owner[t] != i))
        i2t.append(next(r for r, t in enumerate(order, start=1) if owner[t] == i))
    return t2i, i2t


def qb_norm_discounts(
    items: np.ndarray, bank: np.ndarray, beta: float, weight: float
) -> list[float]:
    """QB-Norm's discount of each item, from its definition, in float64."""
    return [
        weight / beta * math.log(float(np.mean(np.exp(beta * (bank.astype(np.float64) @ item)))))
        for item in items.astype(np.float64)
    ]


@pytest.mark.parametrize("query_bank", ["auto", "off"])
def test_eval_retrieval_matches_brute_force(
    sample: tuple[Path, list[dict[str, Any]]], tmp_path: Path, query_bank: str
) -> None:
    path, rows = sample
    out = tmp_path / "sample.json"
    result = CliRunner().invoke(
        app,
        ["eval", "retrieval", str(path), "--json", str(out), "--cache-dir", str(tmp_path),
         "--query-bank", query_bank],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    reported = json.loads(out.read_text())

    encoder = load_encoder(DEFAULT_MODEL)
    captions = [(i, str(c)) for i, row in enumerate(rows) for c in row["captions"]]
    image = encoder.encode_images([str(row["image"]) for row in rows])
    text = encoder.encode_texts([c for _, c in captions])
    owner = [i for i, _ in captions]
    bank = shipped_query_bank(DEFAULT_MODEL)
    assert bank is not None
    if query_bank == "auto":
        assert reported["query_bank"] == {"beta": bank.beta, "weight": bank.weight}
        image_discount = qb_norm_discounts(image, bank.text, bank.beta, bank.weight)
        text_discount = qb_norm_discounts(text, bank.image, bank.beta, bank.weight)
    else:
        assert "query_bank" not in reported
        image_discount, text_discount = [0.0] * len(image), [0.0] * len(text)
    t2i, i2t = brute_force_ranks(image, text, owner, image_discount, text_discount)

    assert reported["n_images"] == SAMPLE and reported["n_texts"] == len(captions)
    for k in (1, 5, 10):
        assert reported["text_to_image"][f"R@{k}"] == pytest.approx(
            100 * sum(r <= k for r in t2i) / len(t2i), abs=1e-3
        )
        assert reported["image_to_text"][f"R@{k}"] == pytest.approx(
            100 * sum(r <= k for r in i2t) / len(i2t), abs=1e-3
        )
    direct = retrieval_metrics(image, text, np.asarray(owner))
    assert direct.median_rank_text_to_image == statistics.median(t2i)
    assert direct.median_rank_image_to_text == statistics.median(i2t)
    # a real model, far above chance (R@10 would be 20% at random on 50 images)
    assert reported["text_to_image"]["R@10"] > 60
