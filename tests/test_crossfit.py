"""Cross-fitted training. RECO: each fold's queries are unseen by its alignment and absent from
its memory, every training pair is a query once, and the CLI trains on the folds. ReT: the
global path trains on head vectors of alignments that never saw the row, and ships the real
head."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmret.cache.layer_features import layer_feature_set
from mmret.cache.tower_features import PairFeatures
from mmret.encoders import load_encoder
from mmret.encoders.ensemble import EnsembleEncoder
from mmret.errors import InputError
from mmret.heads.ret import RetModel
from mmret.ingest.pairs import read_pairs
from mmret.memory.pair_embeddings import first_caption_rows
from mmret.memory.store import Memory, build_memory
from mmret.training.align import AlignTrainingConfig, embed_pairs, train_alignment
from mmret.training.crossfit import cross_fitted_folds, fold_splits
from mmret.training.reco import RecoTrainingConfig
from mmret.training.ret import RetTrainingConfig, cross_fitted_head_vectors

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


RET = RetTrainingConfig(
    image_layers=(7, 8), text_layers=(5, 6), tokens=2, token_dim=8, width=16, heads=2,
    epochs=1, batch_size=4, cross_fit=3,
)  # fmt: skip


def test_ret_trains_on_head_vectors_of_alignments_that_never_saw_the_row(
    trained: tuple[Path, Path, Path],
) -> None:
    manifest, _, cache = trained
    encoder = load_encoder(f"starter:{manifest.parent / 'head'}")
    stored = layer_feature_set(read_pairs(manifest), encoder, [7, 8], [5, 6], cache_dir=cache)
    vectors = cross_fitted_head_vectors(encoder, stored, RET)
    # The first fold's rows, embedded by an alignment trained with the head's recipe on the
    # other folds only, from the pooled last layers the global path reads.
    images, captions = np.arange(12), np.arange(24)
    features = PairFeatures(
        list(stored.image_ids),
        stored.image[8].read_pooled(images).numpy(),
        torch.nn.functional.normalize(stored.text[6].read_pooled(captions)).numpy(),
        np.asarray(stored.text_image),
    )
    held = fold_splits(12, 3, RET.seed)[0]
    rest = np.setdiff1d(images, held)
    recipe = json.loads((manifest.parent / "head" / "training.json").read_text())["config"]
    keep = np.isin(features.text_image, rest)
    position = np.searchsorted(rest, features.text_image[keep])
    head, _ = train_alignment(
        PairFeatures([features.image_ids[i] for i in rest], features.image[rest],
                     features.text[keep], position),
        None,
        AlignTrainingConfig(**recipe),
    )  # fmt: skip
    image, text = embed_pairs(head, features)
    own = np.isin(features.text_image, held)
    np.testing.assert_allclose(vectors.image[held].numpy(), image[held], atol=1e-5)
    np.testing.assert_allclose(vectors.text[own].numpy(), text[own], atol=1e-5)
    # ... and not the real head's, which saw every row.
    real_image, _ = embed_pairs(encoder.head, features)  # type: ignore[attr-defined]
    assert not np.allclose(vectors.image.numpy(), real_image, atol=1e-3)
    # An image+text document's vector is the normalised sum, as the tower makes it.
    pair = vectors.of(held[:1], np.flatnonzero(own)[:1])
    expected = torch.nn.functional.normalize(vectors.image[held[:1]] + vectors.text[own][:1])
    torch.testing.assert_close(pair, expected)


def test_train_ret_cross_fitted_from_the_cli_ships_the_real_head(
    trained: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    manifest, _, cache = trained
    backbone = f"starter:{manifest.parent / 'head'}"
    out = tmp_path / "ret"
    args = [
        "train", "ret", manifest, "--dev", manifest, "--out", out, "--backbone", backbone,
        "--image-layers", "7,8", "--text-layers", "5,6", "--tokens", "2", "--token-dim", "8",
        "--width", "16", "--heads", "2", "--epochs", "1", "--batch-size", "4",
        "--cache-dir", cache,
    ]  # fmt: skip
    assert "RSUM" in run(*args, "--hard-batches")
    config = json.loads((out / "training.json").read_text())["config"]
    assert config["cross_fit"] == 5 and config["hard_batches"]  # a starter backbone: 5 folds
    model, encoder = RetModel.load(out), load_encoder(backbone)
    for tower in (model.query, model.document):
        assert tower.global_head is not None
        for name, weights in encoder.head.state_dict().items():  # type: ignore[attr-defined]
            torch.testing.assert_close(tower.global_head.state_dict()[name], weights)
    refused = run(*args, "--cross-fit", "3", "--no-global-path", code=1)
    assert "needs the global path" in refused
