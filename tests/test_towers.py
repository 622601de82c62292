"""The starter towers are the published pretrained networks, fed the way they were trained."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from mmret.encoders import towers as towers_module
from mmret.encoders.starter import shared_towers
from mmret.encoders.towers import IMAGE_TOWERS, TEXT_TOWER, TOWERS, StarterTowers, TowerPair
from mmret.errors import InputError, RegistryError

EGYPTIAN_CAT, ESPRESSO = 285, 967  # ImageNet classes


def test_image_tower_recognises_imagenet_classes() -> None:
    towers = shared_towers()
    photos = [Image.fromarray(skimage.data.chelsea()), Image.fromarray(skimage.data.coffee())]
    with torch.inference_mode():
        logits = towers.image_model(towers.pixels(photos))
    assert logits.argmax(dim=1).tolist() == [EGYPTIAN_CAT, ESPRESSO]
    features = towers.image_features(photos)
    assert features.shape == (2, 1280)
    assert float(features.min()) >= 0.0 and float(features.max()) <= 6.0  # ReLU6 activations


def test_text_tower_is_a_sentence_embedding() -> None:
    towers = shared_towers()
    vectors = towers.text_features(
        ["a cat on a sofa", "a kitten lying on a couch", "tax law"]
    ).numpy()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.3


@pytest.mark.parametrize("name", ["efficientnet-lite1", "efficientnet-lite2"])
def test_larger_image_towers_recognise_imagenet_classes(name: str) -> None:
    towers = StarterTowers(f"{name}+{TEXT_TOWER}")
    photos = [Image.fromarray(skimage.data.chelsea()), Image.fromarray(skimage.data.coffee())]
    pixels = towers.pixels(photos)
    assert pixels.shape == (2, 3, towers.image_size, towers.image_size)
    assert towers.image_size == IMAGE_TOWERS.get(name).image_size > 224
    with torch.inference_mode():
        logits = towers.image_model(pixels)
    assert logits.argmax(dim=1).tolist() == [EGYPTIAN_CAT, ESPRESSO]
    assert towers.image_features(photos).shape == (2, towers.image_dim)


def test_towers_load_lazily_and_are_shared_per_pair() -> None:
    towers = StarterTowers(TOWERS)
    assert "image_model" not in vars(towers) and "text_model" not in vars(towers)
    towers.text_features(["a dog"])
    assert "text_model" in vars(towers) and "image_model" not in vars(towers)
    assert shared_towers(TOWERS) is shared_towers(TOWERS)


@pytest.mark.parametrize(
    ("name", "error", "message"),
    [
        ("efficientnet-lite0", InputError, "not of the form 'IMAGE\\+TEXT'"),
        ("resnet+all-MiniLM-L6-v2", RegistryError, "unknown image tower 'resnet'"),
        ("efficientnet-lite0+bert", RegistryError, "unknown text tower 'bert'"),
    ],
)
def test_bad_tower_pairs(name: str, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        TowerPair.from_name(name)


def test_the_mpnet_tower_is_a_sentence_embedding() -> None:
    towers = StarterTowers("efficientnet-lite1+all-mpnet-base-v2")
    vectors = towers.text_features(["a cat on a sofa", "a kitten lying on a couch", "tax law"])
    assert vectors.shape == (3, 768)
    np.testing.assert_allclose(np.linalg.norm(vectors.numpy(), axis=1), 1.0, atol=1e-5)
    assert float(vectors[0] @ vectors[1]) > float(vectors[0] @ vectors[2]) + 0.3


def test_mpnet_unpacks_whole_once_and_leaves_no_scratch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("all-mpnet-base-v2/config.json", "{}")
        zipped.writestr("all-mpnet-base-v2/model.safetensors", b"x" * 1000)
    data = archive.read_bytes()
    parts = []
    for number, start in enumerate(range(0, len(data), 300), start=1):
        part = tmp_path / f"part_{number:03d}" / f"all-mpnet-base-v2.zip.{number:03d}"
        part.parent.mkdir()
        part.write_bytes(data[start : start + 300])
        parts.append(part)
    monkeypatch.setenv("MMRET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(towers_module, "_mpnet_parts", lambda: parts)
    folder = towers_module._mpnet_path()
    assert folder == tmp_path / "cache" / "towers" / "all-mpnet-base-v2"
    assert (folder / "model.safetensors").read_bytes() == b"x" * 1000
    assert [p.name for p in folder.parent.iterdir()] == ["all-mpnet-base-v2"]  # no scratch
    monkeypatch.setattr(towers_module, "_mpnet_parts", lambda: pytest.fail("unpacked twice"))
    assert towers_module._mpnet_path() == folder
