"""Ensembles: the dot product of two ensemble vectors is the members' cosines averaged with the
weights, weights are chosen by dev RSUM over a simplex grid, bad configurations are named, and
an ensemble works end to end from the CLI (train, index, search, evaluate)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from mmret import InputError
from mmret.cache.embeddings import PairEmbeddings
from mmret.encoders import load_encoder
from mmret.encoders.ensemble import (
    SHIPPED_ENSEMBLE,
    EnsembleConfig,
    EnsembleEncoder,
    load_ensemble,
)
from mmret.encoders.fingerprint import encoder_fingerprint
from mmret.encoders.hashing import HashEncoder
from mmret.evaluation.retrieval import retrieval_metrics
from mmret.training.ensemble import choose_weights, mixed, mixtures
from tests.cli import run

TEXTS = ["a red square", "a dog on the beach", "two people talking", "", "a blue car"]


def test_the_dot_product_is_the_weighted_sum_of_member_cosines() -> None:
    members = [HashEncoder(8), HashEncoder(16)]
    ensemble = EnsembleEncoder(members, (0.3, 0.7), "test")
    vectors = ensemble.encode_texts(TEXTS)
    assert vectors.shape == (5, 24) and ensemble.dim == 24
    np.testing.assert_allclose(np.linalg.norm(vectors[[0, 1, 2, 4]], axis=1), 1.0, atol=1e-6)
    a, b = (member.encode_texts(TEXTS) for member in members)
    np.testing.assert_allclose(vectors @ vectors.T, 0.3 * (a @ a.T) + 0.7 * (b @ b.T), atol=1e-6)


def test_bad_configurations_are_named(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="two or more members"):
        EnsembleConfig(("hash:8",), (1.0,))
    with pytest.raises(InputError, match="sum to 1"):
        EnsembleConfig(("hash:8", "hash:16"), (0.5, 0.6))
    with pytest.raises(InputError, match="multi-vector"):
        EnsembleEncoder([HashEncoder(8), load_encoder("hash-tokens:4x8")], (0.5, 0.5), "x")
    with pytest.raises(InputError, match=re.escape(f"{tmp_path}: not an ensemble")):
        load_ensemble(str(tmp_path))
    (tmp_path / "ensemble.json").write_text('{"members": ["hash:8"]}')
    with pytest.raises(InputError, match="not a readable ensemble"):
        load_ensemble(str(tmp_path))


def test_mixtures_cover_the_simplex_grid() -> None:
    assert list(mixtures(2, 0.25)) == [(0.25, 0.75), (0.5, 0.5), (0.75, 0.25)]
    three = list(mixtures(3, 0.25))
    assert len(three) == 3 and all(sum(w) == pytest.approx(1) for w in three)
    with pytest.raises(InputError, match=r"--step 0\.3"):
        list(mixtures(2, 0.3))


def test_weights_are_chosen_by_dev_rsum() -> None:
    rng = np.random.default_rng(0)

    def unit(rows: np.ndarray) -> np.ndarray:
        return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)

    text_image = np.repeat(np.arange(20), 2)
    truth = rng.normal(size=(20, 16))
    # Each member sees the truth through its own noise: mixing them averages the noise out.
    dev = [
        PairEmbeddings(
            unit(truth + rng.normal(scale=1.5, size=truth.shape)),
            unit(truth[text_image] + rng.normal(scale=1.5, size=(40, 16))),
            text_image,
        )
        for _ in range(2)
    ]
    config = choose_weights(["a", "b"], dev, step=0.1)
    record = config.record or {}
    assert len(record["dev_rsum"]) == 9 and set(record["dev_rsum_alone"]) == {"a", "b"}
    best = retrieval_metrics(
        mixed([d.image for d in dev], config.weights),
        mixed([d.text for d in dev], config.weights),
        text_image,
    ).rsum
    assert best == pytest.approx(max(record["dev_rsum"].values()), abs=0.01)
    assert best > max(record["dev_rsum_alone"].values())


def test_the_default_ensemble_ships_with_its_dev_record() -> None:
    config = EnsembleConfig.load(SHIPPED_ENSEMBLE)
    assert config.members == ("starter-v2", "starter-v3")
    rsums = (config.record or {})["dev_rsum"]
    assert rsums[", ".join(f"{w:g}" for w in config.weights)] == max(rsums.values())


def test_train_index_search_and_evaluate_an_ensemble_from_the_cli(
    manifest: Path, tmp_path: Path
) -> None:
    folder, index = tmp_path / "ens", tmp_path / "index"
    cache = ["--cache-dir", tmp_path / "cache"]
    output = run(
        "train", "ensemble", "--member", "hash:16", "--member", "hash:32", "--dev", manifest,
        "--out", folder, "--step", "0.25", *cache,
    )  # fmt: skip
    assert "hash:16 alone: dev RSUM" in output and "saved the ensemble" in output
    config = EnsembleConfig.load(folder)
    assert config.members == ("hash:16", "hash:32") and len(config.weights) == 2
    spec = f"ensemble:{folder}"
    run("index", manifest, "--out", index, "--model", spec)
    found = json.loads(run("search", index, "a red square", "--json", "-k", "2"))["results"]
    assert len(found) == 2 and found[0]["id"] == "red"  # its caption is the query, verbatim
    record = tmp_path / "eval.json"
    run("eval", "retrieval", manifest, "--model", spec, "--json", record, *cache)
    assert json.loads(record.read_text())["model"] == f"ensemble:{folder.resolve()}"
    alone = run(
        "train", "ensemble", "--member", "hash:16", "--dev", manifest, "--out", folder, code=1
    )
    assert "two or more --member models" in alone


def test_other_weights_change_the_cache_key() -> None:
    members = [HashEncoder(8), HashEncoder(16)]
    keys = {
        encoder_fingerprint(EnsembleEncoder(members, weights, "same"))
        for weights in ((0.5, 0.5), (0.25, 0.75))
    }
    assert len(keys) == 2
