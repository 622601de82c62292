"""Layer features: the documented shapes and masks for every encoder family, on tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmret import Encoder, InputError, load_encoder
from mmret.layers import LayerFeatures, resolve_layers

from .test_encoders import FACTORIES, images

TEXTS = ["a red square", "two dogs run along a long sandy beach", "x"]
LAYERED = sorted(set(FACTORIES) - {"hash"})


@pytest.fixture(params=LAYERED)
def layered(request: pytest.FixtureRequest, tmp_path: Path) -> Encoder:
    return FACTORIES[request.param](tmp_path / "model")


def check_shapes(features: LayerFeatures, layers: tuple[int, ...], batch: int) -> None:
    assert features.layers == layers
    assert len(features.tokens) == len(features.masks) == len(layers)
    for tokens, mask in zip(features.tokens, features.masks, strict=True):
        assert tokens.dtype == torch.float32 and tokens.ndim == 3 and tokens.shape[0] == batch
        assert mask.dtype == torch.bool and mask.shape == tokens.shape[:2]
        assert torch.isfinite(tokens).all()
    for pooled, tokens in zip(features.pooled(), features.tokens, strict=True):
        assert pooled.shape == (batch, tokens.shape[2])


def test_image_layers_are_full_token_maps(layered: Encoder) -> None:
    count = layered.image_layer_count
    layers = (1, max(1, count // 2), count)
    features = layered.image_layer_features(images()[:3], [1, max(1, count // 2), -1])
    check_shapes(features, layers, 3)
    for mask in features.masks:
        assert mask.all()  # every image token is a real place in the picture


def test_text_masks_mark_real_tokens(layered: Encoder) -> None:
    count = layered.text_layer_count
    features = layered.text_layer_features(TEXTS, [1, -1])
    check_shapes(features, (1, count), 3)
    lengths = features.masks[0].sum(dim=1)
    assert lengths[1] > lengths[0] >= lengths[2] >= 1  # the longer text has more tokens
    assert torch.equal(features.masks[0], features.masks[1])
    # Padding never leaks into a text's features: alone it gets the same (real) tokens.
    alone = layered.text_layer_features(TEXTS[:1], [-1])
    real = features.tokens[1][0, features.masks[1][0]]
    torch.testing.assert_close(real, alone.tokens[0][0, alone.masks[0][0]], atol=1e-4, rtol=1e-4)


def test_starter_last_layers_are_what_the_head_reads(tmp_path: Path) -> None:
    starter = FACTORIES["starter"](tmp_path / "model")
    towers = starter.towers  # type: ignore[attr-defined]
    pictures = images()[:2]
    image = starter.image_layer_features(pictures, [-1])
    torch.testing.assert_close(image.pooled()[0], towers.image_features(pictures))
    assert image.tokens[0].shape == (2, 7 * 7, 1280)
    text = starter.text_layer_features(TEXTS, [-1]).pooled()[0]
    torch.testing.assert_close(
        torch.nn.functional.normalize(text, dim=-1), towers.text_features(TEXTS)
    )
    stages = starter.image_layer_features(pictures, list(range(9)))
    sides = [int(t.shape[1] ** 0.5) for t in stages.tokens]
    assert sides == [112, 112, 56, 28, 14, 14, 7, 7, 7]


def test_hf_image_tokens_are_the_patch_grid(tmp_path: Path) -> None:
    for family in ("hf-clip", "hf-siglip"):
        encoder = FACTORIES[family](tmp_path / family)
        features = encoder.image_layer_features(images()[:2], [0, -1])
        assert [t.shape for t in features.tokens] == [(2, 16, 32), (2, 16, 32)]  # 32/8 = 4x4


def test_encoders_without_layers_say_so() -> None:
    with pytest.raises(InputError, match="exposes no layer features"):
        load_encoder("hash:8").text_layer_features(["x"], [1])


def test_layer_numbers_are_checked(layered: Encoder) -> None:
    with pytest.raises(InputError, match="image layer 99 does not exist"):
        layered.image_layer_features(images()[:1], [99])
    with pytest.raises(InputError, match="choose at least one text layer"):
        layered.text_layer_features(["x"], [])


def test_resolve_layers_counts_from_the_end() -> None:
    assert resolve_layers([-1, -7, 0, 3], 6, "text") == (6, 0, 0, 3)
    with pytest.raises(InputError, match="-8"):
        resolve_layers([-8], 6, "text")
