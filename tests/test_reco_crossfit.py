"""Cross-fitted RECO training: each fold's queries are unseen by its alignment and absent from
its memory, every training pair is a query once, and the CLI trains on the folds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mmret.encoders import load_encoder
from mmret.encoders.ensemble import EnsembleEncoder
from mmret.errors import InputError
from mmret.memory.embedding import first_caption_rows
from mmret.memory.store import Memory, build_memory
from mmret.training.crossfit import cross_fitted_folds
from mmret.training.features import read_pairs
from mmret.training.reco import RecoTrainingConfig

from .cli import run
from .conftest import solid

COLOURS = [(30 * i % 256, 90 * i % 256, 200 - 15 * i) for i in range(12)]
CONFIG = RecoTrainingConfig(k=2, heads=2, ff_dim=8, epochs=2, batch_size=2, cross_fit=3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A manifest of 12 captioned images, an alignment trained on it by `mmret train align`
    (with its training record) and a memory of its pairs: the setting cross-fitting is for."""
    root = tmp_path_factory.mktemp("crossfit")
    (root / "images").mkdir()
    lines = []
    for i, colour in enumerate(COLOURS):
        solid(colour).save(root / "images" / f"c{i}.png")
        captions = [f"colour number {i}", f"a square of shade {i}"]
        lines.append({"id": f"c{i}", "image": f"images/c{i}.png", "captions": captions})
    manifest = root / "train.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    head, cache = root / "head", root / "cache"
    run("train", "align", manifest, "--out", head, "--epochs", "1", "--embed-dim", "16",
        "--hidden-dim", "0", "--batch-size", "8", "--cache-dir", cache)  # fmt: skip
    memory = root / "memory"
    build_memory(manifest, memory, model=f"starter:{head}", cache_dir=cache, max_captions=1)
    return manifest, memory, cache


def test_each_fold_queries_pairs_its_alignment_and_memory_never_saw(
    trained: tuple[Path, Path, Path],
) -> None:
    manifest, memory_dir, cache = trained
    pairs = read_pairs(manifest)
    queries = first_caption_rows(pairs, None)
    with Memory.open(memory_dir) as memory:
        encoder = load_encoder(memory.manifest.encoder)
        with cross_fitted_folds(encoder, pairs, queries, memory, CONFIG, cache_dir=cache) as folds:
            assert len(folds) == 3
            held_out = []
            for fold in folds:
                # The fold's memory holds the other folds' pairs only, in the fold model's
                # space (not the real model's vectors).
                assert len(fold.memory) + len(fold.data.image) == len(memory)
                assert len(fold.data.text) == 2 * len(fold.data.image)
                assert (fold.data.image_neighbours >= 0).all()
                assert (fold.data.image_neighbours < len(fold.memory)).all()
                kept = memory.rows_of(fold.memory.ids)
                assert not np.allclose(fold.memory.vectors["image"], memory.vectors["image"][kept])
                held_out += sorted(set(memory.ids) - set(fold.memory.ids))
            assert sorted(held_out) == sorted(memory.ids)  # every pair is a query once


def test_cross_fitting_refuses_what_it_cannot_retrain(trained: tuple[Path, Path, Path]) -> None:
    manifest, memory_dir, _ = trained
    pairs = read_pairs(manifest)
    queries = first_caption_rows(pairs, 1)
    with Memory.open(memory_dir) as memory:
        refused = cross_fitted_folds(load_encoder("hash:16"), pairs, queries, memory, CONFIG)
        with pytest.raises(InputError, match="trained by `mmret train align`"), refused:
            pass
        fewer = manifest.parent / "fewer.jsonl"  # beside the images
        fewer.write_text("\n".join(manifest.read_text().splitlines()[:6]) + "\n")
        other = read_pairs(fewer)
        refused = cross_fitted_folds(
            load_encoder(memory.manifest.encoder),
            other,
            first_caption_rows(other, 1),
            memory,
            CONFIG,
        )
        with pytest.raises(InputError, match="6 of the 12 pairs"), refused:
            pass
        encoder = load_encoder(memory.manifest.encoder)
        for folds in (1, 13):
            config = RecoTrainingConfig(**{**CONFIG.to_dict(), "cross_fit": folds})
            refused = cross_fitted_folds(encoder, pairs, queries, memory, config)
            with pytest.raises(InputError, match="2 to 12 folds"), refused:
                pass


def test_train_reco_on_cross_fitted_folds(trained: tuple[Path, Path, Path], tmp_path: Path) -> None:
    manifest, memory, cache = trained
    out = tmp_path / "fusion"
    output = run(
        "train", "reco", manifest, "--memory", memory, "--dev", manifest, "--out", out,
        "--cross-fit", "3", "--k", "2", "--epochs", "2", "--batch-size", "2", "--ff-dim", "8",
        "--heads", "2", "--cache-dir", cache,
    )  # fmt: skip
    assert "epoch   2" in output
    record = json.loads((out / "training.json").read_text())
    assert record["config"]["cross_fit"] == 3
    assert record["training_items_with_own_pair_excluded"] == 12
    head = manifest.parent / "head"
    report = run(
        "eval", "retrieval", manifest, "--model", f"starter:{head}", "--memory", memory,
        "--fusion", out, "--memory-k", "2", "--cache-dir", cache,
    )  # fmt: skip
    assert "R@1" in report


def test_an_ensemble_is_cross_fitted_member_by_member(
    trained: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    manifest, memory_dir, cache = trained
    with Memory.open(memory_dir) as memory:
        member = load_encoder(memory.manifest.encoder)
    ensemble = EnsembleEncoder([member, member], [0.25, 0.75], "ensemble:test")
    ensemble_memory = tmp_path / "ensemble-memory"
    build_memory(manifest, ensemble_memory, encoder=ensemble, cache_dir=cache, max_captions=1)
    pairs = read_pairs(manifest)
    with (
        Memory.open(ensemble_memory) as memory,
        cross_fitted_folds(
            ensemble, pairs, first_caption_rows(pairs, 1), memory, CONFIG, cache_dir=cache
        ) as folds,
    ):
        for fold in folds:
            image = fold.data.image
            assert image.shape[1] == 2 * member.dim
            # Each half is a member's unit vector scaled by the square root of its weight.
            halves = (
                np.linalg.norm(image[:, : member.dim], axis=1),
                np.linalg.norm(image[:, member.dim :], axis=1),
            )
            np.testing.assert_allclose(halves[0], 0.5, rtol=1e-5)
            np.testing.assert_allclose(halves[1], np.sqrt(0.75), rtol=1e-5)
