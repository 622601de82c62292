"""open_clip models by name: ``open_clip:ViT-B-32/laion2b_s34b_b79k``.

The part after ``/`` is an open_clip pretrained tag or a checkpoint file path; without it the
model is randomly initialised (useful for tests). open_clip needs torchvision, so it is the
optional ``mmret[open_clip]`` extra and is imported only when such an encoder is built.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from mmret.encoders.base import Encoder
from mmret.encoders.registry import ENCODERS
from mmret.errors import InputError
from mmret.layers import LayerFeatures, grid_tokens


class OpenClipEncoder(Encoder):
    def __init__(self, name: str) -> None:
        try:
            import open_clip
        except ImportError:
            raise InputError(
                "open_clip encoders need the optional extra: pip install 'mmret[open_clip]'"
            ) from None
        model_name, _, pretrained = name.partition("/")
        if not model_name:
            raise InputError(
                "open_clip encoder needs a model: 'open_clip:ViT-B-32/laion2b_s34b_b79k'"
            )
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained or None
            )
        except RuntimeError as error:
            raise InputError(f"open_clip model {name!r} could not be loaded: {error}") from None
        self.model: Any = model.eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.spec = f"open_clip:{name}"
        self._image_count: int | None = None
        self._text_count: int | None = None
        with torch.inference_mode():
            self.dim = int(self.embed_texts(["x"]).shape[1])
        size = getattr(self.model.visual, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, tuple | list) else size)

    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(image) for image in images])
        features: torch.Tensor = self.model.encode_image(pixels)
        return features

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        features: torch.Tensor = self.model.encode_text(self.tokenizer(texts))
        return features

    # Layer features come from open_clip's ``forward_intermediates`` (open_clip >= 2.27): the
    # output of each block, so layer k is block k - 1 and there is no layer 0 (embeddings).

    @property
    def image_layer_count(self) -> int:
        if self._image_count is None:
            pixels = torch.zeros(1, 3, self.image_size, self.image_size)
            self._image_count = len(self._intermediates(image=pixels)["image_intermediates"])
        return self._image_count

    @property
    def text_layer_count(self) -> int:
        if self._text_count is None:
            tokens = self.tokenizer(["x"])
            self._text_count = len(self._intermediates(text=tokens)["text_intermediates"])
        return self._text_count

    def _image_layers(self, images: list[Image.Image], layers: tuple[int, ...]) -> LayerFeatures:
        pixels = torch.stack([self.preprocess(image) for image in images])
        maps = self._intermediates(image=pixels, image_indices=_blocks(layers))
        grids = [grid_tokens(m) for m in _in_order(maps["image_intermediates"], layers)]
        return LayerFeatures(layers, tuple(t for t, _ in grids), tuple(m for _, m in grids))

    def _text_layers(self, texts: list[str], layers: tuple[int, ...]) -> LayerFeatures:
        tokens = self.tokenizer(texts)
        states = self._intermediates(text=tokens, text_indices=_blocks(layers))
        mask = tokens != getattr(self.tokenizer, "pad_id", 0)  # open_clip pads with id 0
        hidden = tuple(
            state.float().contiguous() for state in _in_order(states["text_intermediates"], layers)
        )
        return LayerFeatures(layers, hidden, tuple(mask.clone() for _ in layers))

    def _intermediates(self, **inputs: Any) -> dict[str, Any]:
        if not hasattr(self.model, "forward_intermediates"):
            raise InputError(f"{self.spec}: layer features need open_clip >= 2.27")
        result: dict[str, Any] = self.model.forward_intermediates(**inputs, intermediates_only=True)
        return result


def _blocks(layers: tuple[int, ...]) -> list[int]:
    """open_clip block indices of ``layers``, ascending and unique as it returns them."""
    if 0 in layers:
        raise InputError("open_clip models give block outputs only: layer 0 is not available")
    return sorted({layer - 1 for layer in layers})


def _in_order(outputs: list[torch.Tensor], layers: tuple[int, ...]) -> list[torch.Tensor]:
    by_layer = dict(zip(sorted(set(layers)), outputs, strict=True))
    return [by_layer[layer] for layer in layers]


@ENCODERS.register("open_clip")
def load_open_clip(name: str) -> OpenClipEncoder:
    return OpenClipEncoder(name)
