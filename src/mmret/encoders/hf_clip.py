"""Hugging Face dual encoders (CLIP, SigLIP and kin) by hub name or local directory.

Anything ``transformers.AutoModel`` loads that has ``get_image_features`` and
``get_text_features`` works. In the wild the weights download from the hub; offline, point
the spec at a directory (``hf:/models/clip``) or pre-fill the hub cache.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from mmret._progress import quiet_weight_loading
from mmret.encoders.base import Encoder
from mmret.encoders.registry import ENCODERS
from mmret.errors import InputError
from mmret.layers import LayerFeatures, hidden_state_features


def _features(output: Any) -> torch.Tensor:
    # transformers < 5 returns the projected tensor; 5.x wraps it as ``pooler_output``.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class HuggingFaceEncoder(Encoder):
    def __init__(self, name: str) -> None:
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        if not name:
            raise InputError(
                "hf encoder needs a model: 'hf:openai/clip-vit-base-patch32' or 'hf:DIR'"
            )
        try:
            with quiet_weight_loading():
                self.model = AutoModel.from_pretrained(name).eval()
                self.tokenizer = AutoTokenizer.from_pretrained(name)
                self.processor = AutoImageProcessor.from_pretrained(name)
        except OSError as error:
            raise InputError(f"hf model {name!r} could not be loaded: {error}") from None
        for method in ("get_image_features", "get_text_features"):
            if not hasattr(self.model, method):
                raise InputError(f"hf model {name!r} ({type(self.model).__name__}) has no {method}")
        self.spec = f"hf:{name}"
        config = self.model.config
        self.dim = int(getattr(config, "projection_dim", 0) or config.text_config.hidden_size)
        self.image_size = int(config.vision_config.image_size)
        # SigLIP's text tower was trained on fixed-length, max-padded input.
        self._padding = "max_length" if config.model_type.startswith("siglip") else True
        self._max_length = int(getattr(config.text_config, "max_position_embeddings", 77))

    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return _features(self.model.get_image_features(pixel_values=pixels))

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        return _features(self.model.get_text_features(**self._tokens(texts)))

    @property
    def image_layer_count(self) -> int:
        return int(self.model.config.vision_config.num_hidden_layers)

    @property
    def text_layer_count(self) -> int:
        return int(self.model.config.text_config.num_hidden_layers)

    def _image_layers(self, images: list[Image.Image], layers: tuple[int, ...]) -> LayerFeatures:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        output = self.model.vision_model(pixel_values=pixels, output_hidden_states=True)
        vision = self.model.config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        # CLIP puts a CLS token before the patches, SigLIP does not: keeping the last
        # ``patches`` tokens gives the patch grid for both.
        return hidden_state_features(output.hidden_states, layers, keep_last=patches)

    def _text_layers(self, texts: list[str], layers: tuple[int, ...]) -> LayerFeatures:
        tokens = self._tokens(texts)
        output = self.model.text_model(**tokens, output_hidden_states=True)
        return hidden_state_features(output.hidden_states, layers, tokens.get("attention_mask"))

    def _tokens(self, texts: list[str]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(
            texts,
            padding=self._padding,
            truncation=True,
            max_length=self._max_length,
            return_tensors="pt",
        )
        wanted = {"input_ids", "attention_mask"}
        return {key: value for key, value in tokens.items() if key in wanted}


@ENCODERS.register("hf")
def load_hf(name: str) -> HuggingFaceEncoder:
    return HuggingFaceEncoder(name)
