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


@ENCODERS.register("open_clip")
def load_open_clip(name: str) -> OpenClipEncoder:
    return OpenClipEncoder(name)
