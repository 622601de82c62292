"""Shared fixtures: tiny images of every kind and a small captioned collection, built on the fly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmret.cache.layer_features import LayerFeatureSet, layer_feature_set
from mmret.encoders.base import Encoder
from mmret.encoders.hashing import HashEncoder
from mmret.ingest.pairs import read_pairs

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (230, 220, 30),
}


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (32, 24)) -> Image.Image:
    noise = np.random.default_rng(sum(colour)).integers(0, 20, (size[1], size[0], 3))
    pixels = np.clip(np.array(colour)[None, None, :] + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture
def encoder() -> HashEncoder:
    return HashEncoder(32)


@pytest.fixture
def photo_folder(tmp_path: Path) -> Path:
    """``photos/{colour}.jpg`` with captions, one nested ``more/`` image, one uncaptioned PNG."""
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    for name, colour in COLOURS.items():
        solid(colour).save(folder / f"{name}.jpg")
        (folder / f"{name}.txt").write_text(f"a {name} square")
    solid((128, 128, 128)).save(folder / "more" / "grey.png")
    return folder


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    """A JSONL manifest over four coloured images with metadata for filters."""
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    lines = []
    for year, (name, colour) in enumerate(COLOURS.items(), start=2000):
        solid(colour).save(images / f"{name}.png")
        lines.append(
            {
                "id": name,
                "image": f"images/{name}.png",
                "captions": [f"a {name} square", f"something {name}"],
                "year": year,
                "warm": name in {"red", "yellow"},
                "kind": "colour",
            }
        )
    path = tmp_path / "data" / "items.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


@pytest.fixture
def backbone(tmp_path: Path) -> Encoder:
    """A tiny local CLIP whose layer features the layer heads (HAT, ReT) train on."""
    from .test_encoders import tiny_hf

    return tiny_hf(tmp_path / "clip", "clip")


@pytest.fixture
def stored(manifest: Path, backbone: Encoder, tmp_path: Path) -> LayerFeatureSet:
    """The ``manifest`` fixture's layers 1 and 2 of both towers of ``backbone``, stored."""
    return layer_feature_set(read_pairs(manifest), backbone, [1, 2], [1, 2], cache_dir=tmp_path)
