"""ImageNet knowledge for alignment training: class names, classifier logits, distillation."""

from __future__ import annotations

import numpy as np
import skimage.data
import torch
from PIL import Image

from mmret.encoders.starter import shared_towers
from mmret.training.align import AlignTrainingConfig, embed_pairs, train_alignment
from mmret.training.knowledge import (
    ClassKnowledge,
    classifier_logits,
    imagenet_class_names,
    with_pseudo_captions,
)

from .test_training import synthetic_pairs

EGYPTIAN_CAT, ESPRESSO = 285, 967


def test_class_names_follow_the_classifier_outputs() -> None:
    names = imagenet_class_names()
    assert len(names) == 1000 and len(set(names)) == 998  # "missile", "sunglasses" are twins
    assert (names[0], names[EGYPTIAN_CAT], names[ESPRESSO]) == ("tench", "Egyptian Mau", "espresso")


def test_logits_from_cached_features_equal_the_full_classifier() -> None:
    towers = shared_towers()
    photos = [Image.fromarray(skimage.data.chelsea()), Image.fromarray(skimage.data.coffee())]
    with torch.inference_mode():
        expected = towers.image_model(towers.pixels(photos)).numpy()
    logits = classifier_logits(towers, towers.image_features(photos).numpy())
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def synthetic_knowledge(n_images: int, n_classes: int = 12) -> tuple[ClassKnowledge, np.ndarray]:
    """Classes as directions of the pairs' hidden meaning: the teacher knows each image's class,
    and the class texts are made like captions (the same hidden -> text map)."""
    train = synthetic_pairs(n_images, seed=0)
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((n_classes, 16))
    to_text = np.random.default_rng(101).standard_normal((16, train.text.shape[1]))
    class_text = centres @ to_text
    class_text /= np.linalg.norm(class_text, axis=1, keepdims=True)
    meaning = np.asarray(train.image) @ np.linalg.pinv(
        np.random.default_rng(100).standard_normal((16, train.image.shape[1]))
    )
    logits = 4.0 * meaning @ centres.T
    return ClassKnowledge(class_text.astype(np.float32), logits.astype(np.float32)), logits


def test_pseudo_captions_add_the_top_classes_as_captions() -> None:
    train = synthetic_pairs(50, seed=0)
    knowledge, logits = synthetic_knowledge(50)
    confident = torch.from_numpy(logits).softmax(-1).max(-1).values.numpy() >= 0.3
    augmented = with_pseudo_captions(train, knowledge, top_k=1, min_prob=0.3)
    extra = len(augmented.text) - len(train.text)
    assert extra == int(confident.sum()) > 0
    np.testing.assert_array_equal(
        augmented.text_image[len(train.text) :], np.flatnonzero(confident)
    )
    first = int(np.flatnonzero(confident)[0])
    np.testing.assert_allclose(
        augmented.text[len(train.text)], knowledge.class_text[logits[first].argmax()]
    )


def test_distillation_teaches_the_classes() -> None:
    train = synthetic_pairs(600, seed=0)
    knowledge, logits = synthetic_knowledge(600)
    config = AlignTrainingConfig(embed_dim=32, epochs=3, batch_size=128, learning_rate=3e-3)

    def agreement(weight: float) -> float:
        from dataclasses import replace

        head, _ = train_alignment(
            train, None, replace(config, imagenet_weight=weight), knowledge=knowledge
        )
        image, _ = embed_pairs(head, train)
        with torch.inference_mode():
            classes = torch.nn.functional.normalize(
                head.text(torch.from_numpy(knowledge.class_text)), dim=-1
            ).numpy()
        return float(((image @ classes.T).argmax(1) == logits.argmax(1)).mean())

    assert agreement(1.0) > max(0.8, agreement(0.0))
