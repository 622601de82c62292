"""The offline starter model: frozen EfficientNet-Lite0 + MiniLM towers and mmret's alignment.

``load_encoder("starter")`` uses the alignment shipped in ``mmret/weights/starter``;
``load_encoder("starter:/path/to/head")`` uses one trained by ``mmret train align``.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
from PIL import Image

from mmret.encoders.base import Encoder
from mmret.encoders.layers import (
    LayerFeatures,
    efficientnet_features,
    efficientnet_layer_count,
    hidden_state_features,
)
from mmret.encoders.registry import ENCODERS
from mmret.encoders.towers import IMAGE_SIZE, MAX_TEXT_TOKENS, TOWERS, StarterTowers
from mmret.errors import InputError
from mmret.heads.alignment import AlignmentHead

SHIPPED_HEAD = Path(__file__).resolve().parent.parent / "weights" / "starter"


@cache
def shared_towers() -> StarterTowers:
    """The towers are frozen and stateless, so every starter encoder in a process shares them."""
    return StarterTowers()


class StarterEncoder(Encoder):
    image_size = IMAGE_SIZE

    def __init__(self, head: AlignmentHead, spec: str, towers: StarterTowers | None = None) -> None:
        if head.config.towers != TOWERS:
            raise InputError(
                f"alignment head was trained for towers {head.config.towers!r}, not {TOWERS!r}"
            )
        self.head = head.eval()
        self.spec = spec
        self.dim = head.config.embed_dim
        self._towers = towers

    @property
    def towers(self) -> StarterTowers:
        if self._towers is None:
            self._towers = shared_towers()
        return self._towers

    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        projected: torch.Tensor = self.head.image(self.towers.image_features(images))
        return projected

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        projected: torch.Tensor = self.head.text(self.towers.text_features(texts))
        return projected

    @property
    def layer_source(self) -> str:
        return TOWERS  # the towers are frozen: every alignment head sees the same layers

    @property
    def image_layer_count(self) -> int:
        return efficientnet_layer_count(self.towers.image_model)

    @property
    def text_layer_count(self) -> int:
        return int(self.towers.text_model.config.num_hidden_layers)

    def _image_layers(self, images: list[Image.Image], layers: tuple[int, ...]) -> LayerFeatures:
        return efficientnet_features(self.towers.image_model, self.towers.pixels(images), layers)

    def _text_layers(self, texts: list[str], layers: tuple[int, ...]) -> LayerFeatures:
        tokens = self.towers.tokenizer(
            texts, padding=True, truncation=True, max_length=MAX_TEXT_TOKENS, return_tensors="pt"
        )
        output = self.towers.text_model(**tokens, output_hidden_states=True)
        return hidden_state_features(output.hidden_states, layers, tokens["attention_mask"])


@ENCODERS.register("starter")
def load_starter(head_dir: str) -> StarterEncoder:
    folder = Path(head_dir) if head_dir else SHIPPED_HEAD
    spec = f"starter:{folder.resolve()}" if head_dir else "starter"
    return StarterEncoder(AlignmentHead.load(folder), spec)
