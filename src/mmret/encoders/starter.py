"""The offline starter models: frozen pretrained towers and mmret's alignment on top.

``load_encoder("starter")`` uses the alignment shipped in ``mmret/weights/starter``
(EfficientNet-Lite0 + MiniLM); ``load_encoder("starter:/path/to/head")`` one trained by
``mmret train align``. A head names the tower pair it was trained on, and is served by it.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
from PIL import Image

from mmret.encoders.base import Encoder
from mmret.encoders.registry import ENCODERS
from mmret.encoders.towers import MAX_TEXT_TOKENS, TOWERS, StarterTowers, TowerPair
from mmret.errors import InputError, RegistryError
from mmret.heads.alignment import AlignmentHead
from mmret.layers import (
    LayerFeatures,
    efficientnet_features,
    efficientnet_layer_count,
    hidden_state_features,
)

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
SHIPPED_HEAD = WEIGHTS / "starter"
#: The encoder new indexes, evaluations and the CLI use when none is named. A stronger default
#: gets a new spec name (``starter-v2``, ``starter-v3``, ``starter-v4``) so every existing index
#: keeps opening with the model that built it.
DEFAULT_MODEL = "starter-v4"


@cache
def shared_towers(pair: str = TOWERS) -> StarterTowers:
    """Towers are frozen and stateless, so the starter encoders of a process share each pair."""
    return StarterTowers(pair)


class StarterEncoder(Encoder):
    def __init__(
        self,
        head: AlignmentHead,
        spec: str,
        towers: StarterTowers | None = None,
        *,
        folder: Path | None = None,
    ) -> None:
        try:
            self.pair = TowerPair.from_name(head.config.towers)
        except (InputError, RegistryError) as error:
            raise InputError(
                f"alignment head was trained for towers {head.config.towers!r}, "
                f"which mmret cannot load ({error})"
            ) from None
        if towers is not None and towers.name != self.pair.name:
            raise InputError(
                f"alignment head was trained for towers {self.pair.name!r}, not {towers.name!r}"
            )
        self.image_size = self.pair.image.image_size
        self.head = head.eval()
        self.spec = spec
        self.dim = head.config.embed_dim
        self._towers = towers
        #: The head folder the alignment was loaded from (None: built in memory); its
        #: ``training.json`` says how it was trained.
        self.folder = folder

    @property
    def towers(self) -> StarterTowers:
        if self._towers is None:
            self._towers = shared_towers(self.pair.name)
        return self._towers

    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        projected: torch.Tensor = self.head.image(self.towers.image_features(images))
        return projected

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        projected: torch.Tensor = self.head.text(self.towers.text_features(texts))
        return projected

    @property
    def layer_source(self) -> str:
        return self.pair.name  # frozen towers: every alignment head on them sees the same layers

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
    return StarterEncoder(AlignmentHead.load(folder), spec, folder=folder)


def _register_shipped(name: str, what: str) -> None:
    """``--model NAME``: the alignment shipped in ``mmret/weights/NAME`` (it takes no argument)."""

    def load(rest: str) -> StarterEncoder:
        if rest:
            raise InputError(
                f"{name} takes no argument, got {rest!r} (a trained head is --model starter:DIR)"
            )
        return StarterEncoder(AlignmentHead.load(WEIGHTS / name), name, folder=WEIGHTS / name)

    load.__doc__ = what
    ENCODERS.register(name)(load)


_register_shipped(
    "starter-v2",
    "The starter towers with an alignment that also distilled the ImageNet classifier.",
)
_register_shipped(
    "starter-v3",
    "EfficientNet-Lite1 + all-mpnet-base-v2, aligned with ImageNet distillation: the default.",
)
