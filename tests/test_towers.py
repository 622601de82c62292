"""The starter towers are the published pretrained networks, fed the way they were trained."""

from __future__ import annotations

import numpy as np
import skimage.data
import torch
from PIL import Image

from mmret.encoders.starter import shared_towers

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
