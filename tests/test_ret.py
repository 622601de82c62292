"""ReT: masked modalities, save/load of both sides, seeded resumable training, the encoder,
evaluation by MaxSim and the CLI."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.nn import functional as F  # noqa: N812 - the universal torch idiom
from typer.testing import CliRunner

from mmret import Encoder, InputError, load_encoder
from mmret.cache.layer_features import LayerFeatureSet
from mmret.cli.main import app
from mmret.heads.alignment import AlignmentConfig, AlignmentHead
from mmret.heads.ret import RetConfig, RetModel, pool_grid
from mmret.items import Query
from mmret.late_interaction import maxsim
from mmret.layers import LayerFeatures
from mmret.training.ret import (
    RetEpochLog,
    RetTrainingConfig,
    build_model,
    evaluate_stored,
    neighbourhood_order,
    train_ret,
)

from .test_encoders import images
from .test_hat import StopTrainingError

CONFIG = RetConfig(
    backbone="hash:8",
    image_layers=(1, 2),
    text_layers=(1, 2),
    image_dims=(12, 20),
    text_dims=(10, 10),
    tokens=4,
    token_dim=6,
    width=16,
    heads=2,
)
FAST = RetTrainingConfig(
    image_layers=(1, 2),
    text_layers=(1, 2),
    tokens=3,
    token_dim=8,
    width=16,
    heads=2,
    epochs=3,
    batch_size=2,
)


def features(dims: tuple[int, ...], batch: int, length: int, seed: int) -> LayerFeatures:
    generator = torch.Generator().manual_seed(seed)
    tokens = tuple(torch.randn(batch, length, dim, generator=generator) for dim in dims)
    masks = tuple(torch.ones(batch, length, dtype=torch.bool) for _ in dims)
    return LayerFeatures(CONFIG.image_layers, tokens, masks)


@pytest.mark.parametrize("gates", [True, False])
def test_a_missing_modality_changes_nothing_it_should_not(gates: bool) -> None:
    torch.manual_seed(0)
    tower = RetModel(replace(CONFIG, gates=gates)).eval().document
    image = features(CONFIG.image_dims, 3, 9, seed=1)
    text = features(CONFIG.text_dims, 3, 5, seed=2)
    other_text = features(CONFIG.text_dims, 3, 5, seed=3)
    with torch.no_grad():
        image_only = tower(image, None)
        both = tower(image, text)
        # Row 1 has no text: whatever its text tensor holds is ignored, and its output is the
        # image-only output; rows 0 and 2 are the joint outputs, unaffected by row 1.
        present = torch.tensor([True, False, True])
        mixed = tower(image, text, text_present=present)
        mixed_other = tower(image, replace_row(text, other_text, 1), text_present=present)
        text_only = tower(None, text)
        no_image = tower(image, text, image_present=torch.tensor([False, True, True]))
    torch.testing.assert_close(mixed[1], image_only[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed[[0, 2]], both[[0, 2]], atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed_other, mixed, atol=0, rtol=0)
    torch.testing.assert_close(no_image[0], text_only[0], atol=1e-6, rtol=0)
    assert not torch.allclose(both, image_only, atol=1e-3)  # the text does count when present
    torch.testing.assert_close(both.norm(dim=-1), torch.ones(3, CONFIG.tokens))


def replace_row(base: LayerFeatures, other: LayerFeatures, row: int) -> LayerFeatures:
    tokens = []
    for mine, theirs in zip(base.tokens, other.tokens, strict=True):
        swapped = mine.clone()
        swapped[row] = theirs[row] * 1e3
        tokens.append(swapped)
    return LayerFeatures(base.layers, tuple(tokens), base.masks)


def test_padding_tokens_are_ignored() -> None:
    torch.manual_seed(0)
    tower = RetModel(CONFIG).eval().query
    text = features(CONFIG.text_dims, 2, 4, seed=4)
    padded_tokens = tuple(
        torch.cat([t, 50 * torch.randn(2, 3, t.shape[2])], dim=1) for t in text.tokens
    )
    padded_masks = tuple(
        torch.cat([m, torch.zeros(2, 3, dtype=torch.bool)], dim=1) for m in text.masks
    )
    with torch.no_grad():
        plain = tower(None, text)
        padded = tower(None, LayerFeatures(text.layers, padded_tokens, padded_masks))
    torch.testing.assert_close(plain, padded, atol=1e-5, rtol=0)


def test_large_square_maps_are_pooled() -> None:
    tokens = torch.arange(2 * 196 * 3, dtype=torch.float32).reshape(2, 196, 3)
    pooled, mask = pool_grid(tokens, torch.ones(2, 196, dtype=torch.bool), 7)
    assert pooled.shape == (2, 49, 3) and bool(mask.all())
    maps = tokens.transpose(1, 2).reshape(2, 3, 14, 14)
    torch.testing.assert_close(pooled[:, 0], maps[:, :, :2, :2].mean(dim=(2, 3)))
    text = torch.randn(2, 196, 3)  # padded token sets are not grids
    mask = torch.ones(2, 196, dtype=torch.bool)
    mask[0, -1] = False
    assert pool_grid(text, mask, 7)[0] is text


@pytest.mark.parametrize("shared", [False, True])
def test_query_and_document_sides_round_trip_with_identical_scores(
    shared: bool, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = RetModel(replace(CONFIG, shared=shared)).eval()
    model.save(tmp_path / "ret")
    loaded = RetModel.load(tmp_path / "ret")
    assert loaded.config == model.config
    image = features(CONFIG.image_dims, 3, 9, seed=5)
    text = features(CONFIG.text_dims, 4, 6, seed=6)

    def scores(m: RetModel) -> np.ndarray:
        with torch.no_grad():
            queries = m.query(None, text).flatten(1).numpy()
            documents = m.document(image, None).flatten(1).numpy()
        return maxsim(queries, documents, CONFIG.token_dim)

    np.testing.assert_array_equal(scores(model), scores(loaded))
    if not shared:  # two sides, two sets of weights
        with torch.no_grad():
            assert not torch.allclose(model.query(None, text), model.document(None, text))
    half = tmp_path / "half"
    model.save(half, dtype=torch.float16)
    np.testing.assert_allclose(scores(RetModel.load(half)), scores(model), atol=5e-2)


def test_config_is_checked() -> None:
    with pytest.raises(InputError, match="one image layer and one text layer per step"):
        replace(CONFIG, text_layers=(1,))
    with pytest.raises(InputError, match="divisible"):
        replace(CONFIG, width=15)
    with pytest.raises(InputError, match="task weights"):
        RetTrainingConfig(task_weights=(1.0, 1.0))


def train(
    stored: LayerFeatureSet, backbone: Encoder, config: RetTrainingConfig = FAST, **kwargs: Any
) -> tuple[RetModel, list[dict[str, Any]]]:
    return train_ret(
        stored, stored, config, backbone=backbone.spec, layer_source=backbone.layer_source, **kwargs
    )


def stop_after(epoch: int) -> Callable[[RetEpochLog], None]:
    def check(log: RetEpochLog) -> None:
        if log.epoch == epoch:
            raise StopTrainingError

    return check


def test_training_is_seeded_and_resumes_where_it_stopped(
    stored: LayerFeatureSet, backbone: Encoder, tmp_path: Path
) -> None:
    whole, history = train(stored, backbone)
    again, _ = train(stored, backbone)
    checkpoint = tmp_path / "run" / "checkpoint"
    with pytest.raises(StopTrainingError):
        train(stored, backbone, checkpoint_dir=checkpoint, on_epoch=stop_after(2))
    resumed, resumed_history = train(stored, backbone, checkpoint_dir=checkpoint)
    assert [entry["epoch"] for entry in resumed_history] == [1, 2, 3]
    assert resumed_history == history
    for (name, a), b, c in zip(
        whole.state_dict().items(),
        again.state_dict().values(),
        resumed.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b) and torch.equal(a, c), name
    with pytest.raises(InputError, match="another config"):
        train(stored, backbone, replace(FAST, seed=1), checkpoint_dir=checkpoint)


def test_encoder_serves_the_trained_model_on_both_sides(
    stored: LayerFeatureSet, backbone: Encoder, tmp_path: Path
) -> None:
    model, _ = train(stored, backbone)
    model.save(tmp_path / "ret")
    documents = load_encoder(f"ret:{tmp_path / 'ret'}")
    queries = documents.for_queries()
    assert documents.token_dim == FAST.token_dim and documents.dim == FAST.tokens * FAST.token_dim
    assert (
        queries is not documents and queries.variant == "query" and queries.spec == documents.spec
    )
    assert queries.for_queries() is queries
    text = queries.encode_texts(["a red square", "something green"])
    tokens = text.reshape(2, FAST.tokens, FAST.token_dim)
    np.testing.assert_allclose(np.linalg.norm(tokens, axis=2), 1.0, atol=1e-5)
    # The encoder computes what training scores: the backbone's layer features through a side.
    fresh = backbone.text_layer_features(["a red square"], [1, 2])
    with torch.no_grad():
        expected = model.query(None, fresh).flatten(1).numpy()
    np.testing.assert_allclose(text[:1], expected, atol=1e-5)
    # An image+text input is one joint encoding, not the mean of its halves.
    pairs = documents.encode([Query(text="a red square", image=images()[0])])
    with torch.no_grad():
        joint = model.document(
            backbone.image_layer_features(images()[:1], [1, 2]),
            backbone.text_layer_features(["a red square"], [1, 2]),
        )
    np.testing.assert_allclose(pairs, joint.flatten(1).numpy(), atol=1e-5)
    assert load_encoder(documents.spec).spec == documents.spec


def test_evaluation_scores_by_maxsim(stored: LayerFeatureSet, backbone: Encoder) -> None:
    model, _ = train(stored, backbone)
    retrieval, documents = evaluate_stored(model, stored, forms=("image+text", "image", "text"))
    assert retrieval.n_images == len(stored.image_ids)
    assert documents is not None and set(documents.forms) == {"image+text", "image", "text"}
    quick, none = evaluate_stored(model, stored, full=False)
    assert none is None and quick.n_texts == len(stored.image_ids)


def test_train_ret_cli_and_evaluation_end_to_end(
    manifest: Path, backbone: Encoder, tmp_path: Path
) -> None:
    out = tmp_path / "ret"
    args = [
        "train", "ret", str(manifest), "--dev", str(manifest), "--out", str(out),
        "--backbone", backbone.spec, "--image-layers", "1,-1", "--text-layers", "1,-1",
        "--tokens", "3", "--token-dim", "8", "--width", "16", "--heads", "2",
        "--epochs", "2", "--batch-size", "2", "--cache-dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "RSUM" in result.output
    record = json.loads((out / "training.json").read_text())
    assert [entry["epoch"] for entry in record["history"]] == [1, 2]
    assert record["config"]["cross_fit"] == 0  # no alignment to retrain: the head as it is
    bad = CliRunner().invoke(app, [*args, "--task-weights", "1,x,1"])
    message = " ".join(bad.output.replace("│", " ").split())
    assert bad.exit_code != 0 and "comma-separated list of numbers" in message
    model = f"ret:{out}"
    cache = str(tmp_path / "eval-cache")
    retrieval = CliRunner().invoke(
        app, ["eval", "retrieval", str(manifest), "--model", model, "--cache-dir", cache]
    )
    assert retrieval.exit_code == 0, retrieval.output
    task = tmp_path / "task"
    built = CliRunner().invoke(app, ["eval", "doc-task", str(manifest), "--out", str(task)])
    assert built.exit_code == 0, built.output
    report = tmp_path / "ir.json"
    ir = CliRunner().invoke(
        app,
        [
            "eval", "ir", str(task / "queries.jsonl"), str(task / "corpus.jsonl"),
            str(task / "qrels.tsv"), "--model", model, "--cache-dir", cache,
            "--json", str(report),
        ],
    )  # fmt: skip
    assert ir.exit_code == 0, ir.output
    assert json.loads(report.read_text())["n_queries"] == 4  # one query per second caption
    index = tmp_path / "index.mmret"
    built = CliRunner().invoke(app, ["index", str(manifest), "--out", str(index), "--model", model])
    assert built.exit_code == 0, built.output
    manifest_json = json.loads((index / "manifest.json").read_text())
    assert manifest_json["token_dim"] == 8  # so "auto" searches it by exact MaxSim
    found = CliRunner().invoke(app, ["search", str(index), "a red square", "--json"])
    assert found.exit_code == 0, found.output
    assert (
        "red" in found.output and "maxsim" in CliRunner().invoke(app, ["info", str(index)]).output
    )
    classes = tmp_path / "classes"
    for name, picture in zip(("red", "green"), images(), strict=False):
        (classes / name).mkdir(parents=True)
        picture.save(classes / name / "a.png")
    zero_shot = CliRunner().invoke(
        app, ["eval", "zeroshot", str(classes), "--model", model, "--cache-dir", cache]
    )
    assert zero_shot.exit_code == 0, zero_shot.output
    assert "top-1 accuracy" in zero_shot.output


def test_the_global_head_starts_the_model_at_the_heads_scores(
    stored: LayerFeatureSet, backbone: Encoder
) -> None:
    torch.manual_seed(0)
    head = AlignmentHead(
        AlignmentConfig(
            image_dim=stored.image[2].tokens.shape[1],
            text_dim=stored.text[2].tokens.shape[1],
            embed_dim=16,
            hidden_dim=8,
        )
    ).eval()
    model = build_model(stored, FAST, backbone.spec, backbone.layer_source, head).eval()
    rows = np.arange(len(stored.image_ids))
    with torch.no_grad():
        image = model.document(stored.image_features(rows, [1, 2]), None)
        pooled = stored.image[2].read_pooled(rows)
        expected = F.normalize(model.document.global_out(F.normalize(head.image(pooled))), dim=-1)
        model.train()
        assert model.query.global_head is not None and not model.query.global_head.training
    # Untrained, every token is the head's vector projected: MaxSim / T is that cosine.
    torch.testing.assert_close(image, expected[:, None].expand_as(image), atol=1e-3, rtol=0)
    assert all(not p.requires_grad for p in model.query.global_head.parameters())
    other = AlignmentHead(AlignmentConfig(image_dim=7, text_dim=head.config.text_dim))
    with pytest.raises(InputError, match="last layers"):
        build_model(stored, FAST, backbone.spec, backbone.layer_source, other)


def test_hard_batches_group_near_neighbours() -> None:
    # Two tight clusters of three: every batch of three is one cluster, whatever the seeds.
    vectors = F.normalize(
        torch.tensor([[1.0, 0.1], [0.0, 1.0], [1.0, 0.0], [0.1, 1.0], [1.0, 0.05], [0.05, 1.0]]),
        dim=-1,
    )
    for seeds in ([0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [3, 0, 1, 2, 4, 5]):
        order = neighbourhood_order(vectors, np.asarray(seeds), 3)
        assert sorted(order.tolist()) == list(range(6))
        assert {frozenset(order[:3].tolist()), frozenset(order[3:].tolist())} == {
            frozenset({0, 2, 4}),
            frozenset({1, 3, 5}),
        }
        assert order[0] == seeds[0]
    with pytest.raises(InputError, match="need --cross-fit"):
        RetTrainingConfig(hard_batches=True)


def test_a_cross_fitted_config_needs_its_head_vectors(
    stored: LayerFeatureSet, backbone: Encoder
) -> None:
    with pytest.raises(InputError, match="cross_fitted_head_vectors"):
        train(stored, backbone, replace(FAST, cross_fit=3))
