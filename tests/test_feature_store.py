"""The stored layer feature set: bit-identical reloads, just-in-time reads, reuse, bad images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmret import Encoder
from mmret.cache.layer_features import LayerFeatureSet, StoredLayer, layer_feature_set
from mmret.ingest.pairs import read_pairs
from mmret.ingest.report import SkipReport

from .test_encoders import tiny_hf


@pytest.fixture
def clip(tmp_path: Path) -> Encoder:
    return tiny_hf(tmp_path / "clip", "clip")


def store(manifest: Path, encoder: Encoder, cache: Path, **layers: list[int]) -> LayerFeatureSet:
    return layer_feature_set(
        read_pairs(manifest),
        encoder,
        layers.get("image", [1, -1]),
        layers.get("text", [0, 2]),
        cache_dir=cache,
    )


def test_stored_features_are_the_encoders_in_float16(
    manifest: Path, clip: Encoder, tmp_path: Path
) -> None:
    stored = store(manifest, clip, tmp_path / "cache")
    pairs = read_pairs(manifest)
    assert stored.image_ids == pairs.image_ids and list(stored.text_image) == [
        0,
        0,
        1,
        1,
        2,
        2,
        3,
        3,
    ]
    direct = clip.image_layer_features(pairs.images, [1, 2])
    read = stored.image_features(np.arange(4), [1, 2])
    for want, got in zip(direct.tokens, read.tokens, strict=True):
        assert torch.equal(want.half().float(), got)
    for want, layer in zip(direct.pooled(), (1, 2), strict=True):
        assert torch.equal(want.half().float(), stored.image[layer].read_pooled(np.arange(4)))
    rows = [3, 0, 5]  # any order: a training batch is a random draw
    direct_text = clip.text_layer_features([pairs.texts[i] for i in rows], [0, 2])
    read_text = stored.text_features(rows, [0, 2])
    for want, got, mask in zip(direct_text.tokens, read_text.tokens, read_text.masks, strict=True):
        assert torch.equal(mask, direct_text.masks[0])
        assert torch.equal(want.half().float()[mask], got[mask])
        assert not got[~mask].any()  # padding is zeros


def test_a_stored_set_reloads_bit_identically(
    manifest: Path, clip: Encoder, tmp_path: Path
) -> None:
    first = store(manifest, clip, tmp_path / "cache")
    again = store(manifest, clip, tmp_path / "cache")  # opened, not extracted again
    assert again.folder == first.folder
    for name in ("image", "text"):
        for layer, stored in getattr(first, name).items():
            reloaded = getattr(again, name)[layer]
            for array in ("tokens", "offsets", "pooled"):
                a, b = getattr(stored, array), getattr(reloaded, array)
                assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    assert first.image[1].tokens.dtype == np.float16
    assert isinstance(again.image[1].tokens, np.memmap)  # read just in time, not loaded


def test_missing_layers_are_added_and_present_ones_reused(
    manifest: Path, clip: Encoder, tmp_path: Path
) -> None:
    first = store(manifest, clip, tmp_path / "cache", image=[1], text=[2])
    made = (first.folder / "image-1" / "tokens.npy").stat().st_mtime_ns
    more = store(manifest, clip, tmp_path / "cache", image=[1, 0], text=[2, 1])
    assert sorted(more.image) == [0, 1] and sorted(more.text) == [1, 2]
    assert (first.folder / "image-1" / "tokens.npy").stat().st_mtime_ns == made


def test_a_broken_image_is_dropped_with_its_captions(
    manifest: Path, clip: Encoder, tmp_path: Path
) -> None:
    (manifest.parent / "images" / "green.png").write_bytes(b"not a picture")
    report = SkipReport()
    stored = layer_feature_set(
        read_pairs(manifest), clip, [1], [1], cache_dir=tmp_path / "cache", report=report
    )
    assert stored.image_ids == ["red", "blue", "yellow"]
    assert list(stored.text_image) == [0, 0, 1, 1, 2, 2]
    assert len(stored.text[1]) == 6 and report.skipped == 1
    assert json.loads((stored.folder / "pairs.json").read_text())["image_ids"] == stored.image_ids


def test_ragged_rows_pad_per_batch(tmp_path: Path) -> None:
    tokens = np.arange(12, dtype=np.float16).reshape(6, 2)
    layer = StoredLayer(tokens, np.array([0, 1, 4, 6]), np.zeros((3, 2), np.float16))
    read, mask = layer.read([1, 0])
    assert read.shape == (2, 3, 2)
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    assert read[1, 0].tolist() == [0.0, 1.0] and read[0, 2].tolist() == [6.0, 7.0]
