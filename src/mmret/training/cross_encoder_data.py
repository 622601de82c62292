"""Stored layer features as the cross-encoder's training and calibration read them."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from mmret.cache.layer_features import LayerFeatureSet
from mmret.errors import InputError
from mmret.evaluation.reranked import StoredSides
from mmret.heads.cross_encoder import CrossEncoder, SideTokens, image_grid

CHUNK = 2048


class ReadsLayers(Protocol):
    """The layers and image grid a model (or its training config) reads."""

    @property
    def image_layer(self) -> int: ...
    @property
    def text_layer(self) -> int: ...
    @property
    def image_grid(self) -> int: ...


class RerankData:
    """A stored feature set as the training loop reads it: image grids by image row, texts by
    caption row, and the bi-encoder inputs (mean tokens) of all of them."""

    def __init__(self, features: LayerFeatureSet, config: ReadsLayers) -> None:
        for name, stored, layer in (
            ("image", features.image, config.image_layer),
            ("text", features.text, config.text_layer),
        ):
            if layer not in stored:
                raise InputError(f"the feature store has no {name} layer {layer}")
        self.features = features
        self.images = features.image[config.image_layer]
        self.texts = features.text[config.text_layer]
        self.grid = config.image_grid
        self.owner = np.asarray(features.text_image, dtype=np.int64)
        self.sides = StoredSides(features, config.image_layer, config.text_layer)
        # The bi-encoder reads the mean of the pooled grid (what a stored grid gives too).
        self.image_means = torch.cat(
            [
                image_grid(
                    self.images.read(np.arange(s, min(s + CHUNK, len(self.images))))[0], self.grid
                ).mean(dim=1)
                for s in range(0, len(self.images), CHUNK)
            ]
        )
        self.captions_of = [np.flatnonzero(self.owner == i) for i in range(len(self.images))]

    def image_side(self, rows: np.ndarray) -> SideTokens:
        return self.sides.images(rows)

    def text_side(self, rows: np.ndarray) -> SideTokens:
        return self.sides.texts(rows)

    def embed(self, model: CrossEncoder) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, E)`` image and ``(T, E)`` caption unit vectors of the bi-encoder."""
        model.eval()
        with torch.inference_mode():
            image = torch.cat(
                [model.embed_pooled(chunk, None) for chunk in torch.split(self.image_means, CHUNK)]
            )
            text = torch.cat(
                [
                    model.embed_pooled(None, self.texts.read_pooled(np.arange(s, e)))
                    for s, e in spans(len(self.texts))
                ]
            )
        return image, text


def embed_stored(model: CrossEncoder, features: LayerFeatureSet) -> tuple[np.ndarray, np.ndarray]:
    """The bi-encoder's ``(N, E)`` image and ``(T, E)`` caption unit vectors of a stored set
    (the first stage of the joint model)."""
    image, text = RerankData(features, model.config).embed(model)
    return image.numpy(), text.numpy()


def spans(count: int, chunk: int = CHUNK) -> list[tuple[int, int]]:
    return [(s, min(s + chunk, count)) for s in range(0, count, chunk)]
