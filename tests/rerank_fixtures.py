"""A weightless encoder with deterministic layer features and a tiny reranker over them."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from mmret.encoders.hashing import HashEncoder, _word_vector
from mmret.heads.cross_encoder import CrossEncoder, RerankConfig
from mmret.layers import LayerFeatures
from mmret.reranker import Reranker, TokenFeatureSpec

IMAGE_DIM, TEXT_DIM = 6, 8


class LayerHashEncoder(HashEncoder):
    """``hash:DIM`` plus one image layer (a 4x4 thumbnail, each pixel a token of its colour
    and its complement) and one text layer (a token per word, the word's hash vector)."""

    @property
    def layer_source(self) -> str:
        return "test-layers"

    @property
    def image_layer_count(self) -> int:
        return 1

    @property
    def text_layer_count(self) -> int:
        return 1

    def _image_layers(self, images: list[Image.Image], layers: tuple[int, ...]) -> LayerFeatures:
        pixels = np.stack(
            [np.asarray(i.convert("RGB").resize((4, 4)), np.float32) / 255 for i in images]
        ).reshape(len(images), 16, 3)
        tokens = torch.from_numpy(np.concatenate([pixels, 1 - pixels], axis=2))
        return LayerFeatures(layers, (tokens,), (torch.ones(len(images), 16, dtype=torch.bool),))

    def _text_layers(self, texts: list[str], layers: tuple[int, ...]) -> LayerFeatures:
        words = [text.lower().split() or [""] for text in texts]
        longest = max(len(w) for w in words)
        tokens = torch.zeros(len(texts), longest, TEXT_DIM)
        mask = torch.zeros(len(texts), longest, dtype=torch.bool)
        for row, sentence in enumerate(words):
            for column, word in enumerate(sentence):
                tokens[row, column] = torch.from_numpy(_word_vector(word, TEXT_DIM))
                mask[row, column] = True
        return LayerFeatures(layers, (tokens,), (mask,))


def tiny_config(joint: bool = True) -> RerankConfig:
    return RerankConfig(
        backbone="hash:32",
        layer_source="test-layers",
        image_layer=1,
        text_layer=1,
        image_dim=IMAGE_DIM,
        text_dim=TEXT_DIM,
        image_grid=2,
        embed_dim=8,
        hidden_dim=16,
        width=16,
        layers=1,
        heads=2,
        ff_dim=16,
        joint=joint,
    )


def tiny_reranker(encoder: LayerHashEncoder, seed: int = 0) -> Reranker:
    torch.manual_seed(seed)
    model = CrossEncoder(tiny_config())
    with torch.no_grad():  # random weights everywhere, so every part moves the score
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)
        model.image.std.fill_(1.0)
        model.text.std.fill_(1.0)
    return Reranker(model.eval(), encoder)


def tiny_spec(encoder: LayerHashEncoder) -> TokenFeatureSpec:
    return tiny_reranker(encoder).spec
