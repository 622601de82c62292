"""HAT: the one-vector form, save/load, seeded and resumable training, the encoder and the CLI."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from typer.testing import CliRunner

from mmret import Encoder, InputError, load_encoder
from mmret.cache.layer_features import LayerFeatureSet, layer_feature_set
from mmret.cli.main import app
from mmret.heads.hat import HatConfig, HierarchicalAlignmentHead, level_similarities
from mmret.ingest.pairs import read_pairs
from mmret.training.hat import HatEpochLog, HatTrainingConfig, embed_set, train_hat
from mmret.training.knowledge import LevelKnowledge, imagenet_level_knowledge

from .test_encoders import images

CONFIG = HatConfig(
    backbone="hash:8",
    image_layers=(1, 2, 3),
    text_layers=(1, 2, 3),
    image_dims=(20, 12, 40),
    text_dims=(10, 10, 24),
    embed_dim=8,
    hidden_dim=16,
)
FAST = HatTrainingConfig(
    image_layers=(1, 2), text_layers=(1, 2), embed_dim=8, hidden_dim=16, epochs=3, batch_size=4
)


def random_levels(head: HierarchicalAlignmentHead, n: int, image: bool) -> torch.Tensor:
    dims = head.config.image_dims if image else head.config.text_dims
    pooled = [torch.randn(n, dim) for dim in dims]
    return head.image_levels(pooled) if image else head.text_levels(pooled)


def test_vector_dot_product_is_the_weighted_level_similarity() -> None:
    torch.manual_seed(0)
    head = HierarchicalAlignmentHead(CONFIG).eval()
    with torch.no_grad():
        head.level_logits.copy_(torch.tensor([0.3, -1.2, 2.0]))  # far from uniform
        image, text = random_levels(head, 5, True), random_levels(head, 7, False)
        weights = head.weights
        expected = (weights[:, None, None] * level_similarities(image, text)).sum(dim=0)
        vectors = head.item_vectors(image) @ head.item_vectors(text).T
    torch.testing.assert_close(vectors, expected, atol=1e-6, rtol=1e-6)
    assert vectors.shape == (5, 7) and head.item_vectors(image).shape == (5, CONFIG.dim)
    torch.testing.assert_close(head.item_vectors(image).norm(dim=1), torch.ones(5))
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0))


def test_head_round_trips_through_save_and_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    head = HierarchicalAlignmentHead(CONFIG).eval()
    with torch.no_grad():
        head.level_logits.copy_(torch.tensor([0.5, 0.0, -0.5]))
    head.save(tmp_path / "hat")
    loaded = HierarchicalAlignmentHead.load(tmp_path / "hat")
    assert loaded.config == head.config
    for (name, a), b in zip(head.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    head.save(tmp_path / "half", dtype=torch.float16)
    half = HierarchicalAlignmentHead.load(tmp_path / "half")
    pooled = [torch.randn(3, dim) for dim in CONFIG.image_dims]
    torch.testing.assert_close(
        half.item_vectors(half.image_levels(pooled)),
        head.item_vectors(head.image_levels(pooled)),
        atol=2e-2,
        rtol=0,
    )


def test_levels_must_pair_up() -> None:
    with pytest.raises(InputError, match="one image layer and one text layer per level"):
        HatConfig("starter", (1, 2), (1,), (4, 4), (4,))


def train(
    stored: LayerFeatureSet, backbone: Encoder, config: HatTrainingConfig = FAST, **kwargs: Any
) -> tuple[HierarchicalAlignmentHead, list[dict[str, Any]]]:
    return train_hat(
        stored, stored, config, backbone=backbone.spec, layer_source=backbone.layer_source, **kwargs
    )


class StopTrainingError(Exception):
    """Stands for a run killed mid-way."""


def stop_after(epoch: int) -> Callable[[HatEpochLog], None]:
    def check(log: HatEpochLog) -> None:
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
    resumed_epochs: list[int] = []
    resumed, resumed_history = train(
        stored,
        backbone,
        checkpoint_dir=checkpoint,
        on_epoch=lambda log: resumed_epochs.append(log.epoch),
    )
    assert resumed_epochs == [3]  # epochs 1 and 2 came from the checkpoint
    assert [entry["epoch"] for entry in resumed_history] == [1, 2, 3]
    assert resumed_history == history
    for (name, a), b, c in zip(
        whole.state_dict().items(),
        again.state_dict().values(),
        resumed.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b) and torch.equal(a, c), name


def test_resume_refuses_another_config(
    stored: LayerFeatureSet, backbone: Encoder, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "checkpoint"
    train(stored, backbone, checkpoint_dir=checkpoint)
    with pytest.raises(InputError, match="another config"):
        train(stored, backbone, replace(FAST, seed=1), checkpoint_dir=checkpoint)


def test_hat_encoder_serves_the_trained_head(
    stored: LayerFeatureSet, backbone: Encoder, tmp_path: Path
) -> None:
    head, _ = train(stored, backbone)
    head.save(tmp_path / "hat")
    encoder = load_encoder(f"hat:{tmp_path / 'hat'}")
    assert encoder.dim == 2 * FAST.embed_dim and encoder.layer_source == backbone.layer_source
    image = encoder.encode_images(images()[:2])
    text = encoder.encode_texts(["a red square", "something green"])
    np.testing.assert_allclose(np.linalg.norm(image, axis=1), 1.0, atol=1e-5)
    # The encoder computes exactly what training scored: the stored features through the head.
    pooled = backbone.text_layer_features(["a red square"], [1, 2]).pooled()
    with torch.no_grad():
        expected = head.item_vectors(head.text_levels(pooled)).numpy()
    np.testing.assert_allclose(text[:1], expected, atol=1e-5)
    assert load_encoder(encoder.spec).spec == encoder.spec
    # Its layer features are its backbone's (what a reranker's token features read).
    torch.testing.assert_close(
        encoder.text_layer_features(["a red square"], [1, 2]).pooled(), pooled
    )


def test_train_hat_cli_end_to_end(manifest: Path, backbone: Encoder, tmp_path: Path) -> None:
    out = tmp_path / "hat"
    args = [
        "train", "hat", str(manifest), "--dev", str(manifest), "--out", str(out),
        "--backbone", backbone.spec, "--image-layers", "1,-1", "--text-layers", "1,-1",
        "--embed-dim", "8", "--hidden-dim", "16", "--epochs", "2", "--batch-size", "4",
        "--cache-dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "RSUM" in result.output and "weights" in result.output
    assert (out / "checkpoint" / "state.json").is_file()
    history = json.loads((out / "training.json").read_text())["history"]
    assert [entry["epoch"] for entry in history] == [1, 2]
    assert json.loads((out / "config.json").read_text())["config"]["image_layers"] == [1, 2]
    rerun = CliRunner().invoke(app, args)  # everything done: resumes at the end, same head
    assert rerun.exit_code == 0, rerun.output
    assert "epoch" not in rerun.output.split("saved")[0].split("Text layers")[-1]
    bad = CliRunner().invoke(app, [*args[:-2], "--image-layers", "1,x"])
    message = " ".join(bad.output.replace("│", " ").split())
    assert bad.exit_code != 0 and "comma-separated list of layer numbers" in message


def test_the_shipped_head_serves_offline() -> None:
    encoder = load_encoder("hat")
    assert encoder.spec == "hat" and encoder.dim == 512
    vectors = encoder.encode_texts(["a dog runs on the beach", "two children play"])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    image = encoder.encode_images(images()[:1])
    assert image.shape == (1, 512)


def synthetic_level_knowledge(stored: LayerFeatureSet, n_classes: int = 2) -> LevelKnowledge:
    """Random class prompts per level and a teacher that puts image ``i`` in class ``i % C``."""
    rng = np.random.default_rng(3)
    class_text = tuple(
        rng.standard_normal((n_classes, stored.text[layer].pooled.shape[1])).astype(np.float32)
        for layer in FAST.text_layers
    )
    n_images = len(stored.image_ids)
    logits = np.full((n_images, n_classes), -8.0, dtype=np.float32)
    logits[np.arange(n_images), np.arange(n_images) % n_classes] = 8.0
    return LevelKnowledge(class_text, logits)


def test_distillation_ranks_the_classes_as_the_teacher(
    stored: LayerFeatureSet, backbone: Encoder
) -> None:
    knowledge = synthetic_level_knowledge(stored)
    config = replace(FAST, epochs=40, learning_rate=1e-2)

    def agreement(weight: float) -> float:
        head, _ = train(
            stored, backbone, replace(config, imagenet_weight=weight), knowledge=knowledge
        )
        image, _ = embed_set(head, stored)
        with torch.no_grad():
            class_text = [torch.from_numpy(c) for c in knowledge.class_text]
            classes = head.item_vectors(head.text_levels(class_text)).numpy()
        teacher = knowledge.image_logits.argmax(axis=1)
        return float(((image @ classes.T).argmax(axis=1) == teacher).mean())

    assert agreement(5.0) == 1.0 > agreement(0.0)
    with pytest.raises(InputError, match="ImageNet knowledge of every text level"):
        train(stored, backbone, replace(FAST, imagenet_weight=1.0))


def test_level_knowledge_reads_the_classifier_and_the_prompts(tmp_path: Path) -> None:
    starter = load_encoder("starter")
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("chelsea", "coffee"):
        Image.fromarray(getattr(skimage.data, name)()).save(photos / f"{name}.png")
    rows = [{"id": n, "image": f"photos/{n}.png", "captions": [n]} for n in ("chelsea", "coffee")]
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    stored = layer_feature_set(read_pairs(manifest), starter, [8], [4, 6], cache_dir=tmp_path)
    cat, espresso = 285, 967
    knowledge = imagenet_level_knowledge(
        starter, stored, [4, 6], classes=[cat, espresso], templates=["a photo of a {}.", "{}"]
    )
    assert knowledge.image_logits.shape == (2, 2)
    assert list(knowledge.image_logits.argmax(axis=1)) == [0, 1]  # the cat, the espresso
    prompts = ["a photo of a Egyptian Mau.", "Egyptian Mau"]
    with torch.inference_mode():
        expected = starter.text_layer_features(prompts, [4, 6]).pooled()
    for level, tensor in enumerate(expected):
        assert knowledge.class_text[level].shape == (2, tensor.shape[1])
        np.testing.assert_allclose(knowledge.class_text[level][0], tensor.mean(0), atol=1e-5)
    with pytest.raises(InputError, match="needs an image tower with an ImageNet classifier"):
        imagenet_level_knowledge(load_encoder("hash:8"), stored, [4, 6])
