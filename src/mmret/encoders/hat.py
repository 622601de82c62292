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

from mmret.encoders.base import Encoder
from mmret.encoders.registry import ENCODERS
from mmret.errors import InputError
from mmret.heads.hat import HierarchicalAlignmentHead

SHIPPED_HAT = Path(__file__).resolve().parent.parent / "weights" / "hat"


class HatEncoder(Encoder):
    def __init__(self, head: HierarchicalAlignmentHead, spec: str, backbone: Encoder) -> None:
        config = head.config
        if config.layer_source and backbone.layer_source != config.layer_source:
            raise InputError(
                f"HAT head was trained on the layers of {config.layer_source!r}, but its "
                f"backbone {config.backbone!r} now gives those of {backbone.layer_source!r}"
            )
        self.head = head.eval()
        self.backbone = backbone
        self.spec = spec
        self.dim = config.dim
        self.image_size = backbone.image_size

    @property
    def layer_source(self) -> str:
        return self.backbone.layer_source

    @property
    def image_layer_count(self) -> int:
        return self.backbone.image_layer_count

    @property
    def text_layer_count(self) -> int:
        return self.backbone.text_layer_count

    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        features = self.backbone.image_layer_features(images, self.head.config.image_layers)
        return self.head.item_vectors(self.head.image_levels(features.pooled()))

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        features = self.backbone.text_layer_features(texts, self.head.config.text_layers)
        return self.head.item_vectors(self.head.text_levels(features.pooled()))


@ENCODERS.register("hat")
def load_hat(head_dir: str) -> HatEncoder:
    from mmret.encoders import load_encoder  # the package imports this module to register it

    folder = Path(head_dir) if head_dir else SHIPPED_HAT
    if not head_dir and not (folder / "config.json").is_file():
        raise InputError("no HAT head ships with this mmret; train one and use --model hat:DIR")
    spec = f"hat:{folder.resolve()}" if head_dir else "hat"
    head = HierarchicalAlignmentHead.load(folder)
    return HatEncoder(head, spec, load_encoder(head.config.backbone))
