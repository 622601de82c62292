"""HAT: a hierarchical alignment head over a backbone encoder's layer features (``hat:DIR``).

``load_encoder("hat")`` uses the head shipped in ``mmret/weights/hat``; ``hat:DIR`` one trained
by ``mmret train hat``. The head folder names its backbone (e.g. ``starter``, whose frozen
towers give the layers); a vector is the head's one-vector form of the level embeddings (see
:mod:`mmret.heads.hat`), so every index backend serves it as it serves any other encoder's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from mmret.encoders.base import Encoder, HeadOnBackbone
from mmret.encoders.registry import ENCODERS, load_encoder
from mmret.errors import InputError
from mmret.heads.hat import HierarchicalAlignmentHead

SHIPPED_HAT = Path(__file__).resolve().parent.parent / "weights" / "hat"


class HatEncoder(HeadOnBackbone):
    def __init__(self, head: HierarchicalAlignmentHead, spec: str, backbone: Encoder) -> None:
        config = head.config
        super().__init__(backbone, "HAT head", config.backbone, config.layer_source)
        self.head = head.eval()
        self.spec = spec
        self.dim = config.dim

    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        features = self.backbone.image_layer_features(images, self.head.config.image_layers)
        return self.head.item_vectors(self.head.image_levels(features.pooled()))

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        features = self.backbone.text_layer_features(texts, self.head.config.text_layers)
        return self.head.item_vectors(self.head.text_levels(features.pooled()))


@ENCODERS.register("hat")
def load_hat(head_dir: str) -> HatEncoder:
    folder = Path(head_dir) if head_dir else SHIPPED_HAT
    if not head_dir and not (folder / "config.json").is_file():
        raise InputError("no HAT head ships with this mmret; train one and use --model hat:DIR")
    spec = f"hat:{folder.resolve()}" if head_dir else "hat"
    head = HierarchicalAlignmentHead.load(folder)
    return HatEncoder(head, spec, load_encoder(head.config.backbone))
