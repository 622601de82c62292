"""The encoder interface: images and texts in, L2-normalised vectors in one shared space out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol, TypeVar

import numpy as np
import torch
from PIL import Image

from mmret._progress import progress
from mmret.errors import InputError
from mmret.ingest.images import load_image
from mmret.items import ImageInput
from mmret.late_interaction import normalise_tokens
from mmret.layers import LayerFeatures, resolve_layers

T = TypeVar("T")

#: Texts are cut to this many characters before encoding, far beyond what towers read.
MAX_TEXT_CHARS = 10_000


class Content(Protocol):
    """Anything with an optional text and an optional image: a ``Query`` or an ``Item``."""

    @property
    def text(self) -> str | None: ...

    @property
    def image(self) -> ImageInput | None: ...


def batched(values: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


class Encoder(ABC):
    """Embeds images and texts into one space of ``dim`` dimensions.

    Subclasses implement :meth:`embed_images` and :meth:`embed_texts` on one batch of decoded
    inputs; this class adds batching, progress bars, normalisation and image+text combination.
    An image+text input is embedded as ``normalise(normalise(image) + normalise(text))``: the
    direction halfway between its two views, so it is close to queries that match either.
    """

    #: The string :func:`mmret.encoders.load_encoder` recreates this encoder from.
    spec: str
    dim: int
    #: ``None`` for one vector per input. A multi-vector (late-interaction) encoder sets the
    #: size of its tokens: each embedding row is then ``dim // token_dim`` unit tokens,
    #: flattened, scored by :func:`mmret.late_interaction.maxsim`.
    token_dim: int | None = None
    #: Tells apart encoders that share a spec but embed differently (a ReT model's query
    #: side); caches key on it.
    variant: str = ""
    #: Side in pixels the image tower works at (lets JPEG decoding skip needless detail).
    image_size: int = 224
    batch_size: int = 32

    @abstractmethod
    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        """``(B, dim)`` embeddings of decoded RGB images (normalisation not required)."""

    @abstractmethod
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """``(B, dim)`` embeddings of texts (normalisation not required)."""

    def for_queries(self) -> Encoder:
        """The encoder for queries: this one, unless queries and documents have separate
        models (ReT's query and document sides), whose scores then compare a query side's
        embedding with a document side's."""
        return self

    def normalise(self, vectors: np.ndarray) -> np.ndarray:
        """Unit rows, or for a multi-vector encoder unit tokens within each ``(N, dim)`` row."""
        return normalise_tokens(vectors, self.token_dim)

    @property
    def image_layer_count(self) -> int:
        """How many layers follow the image tower's layer 0 (0: no layer features)."""
        return 0

    @property
    def text_layer_count(self) -> int:
        """How many layers follow the text tower's layer 0 (0: no layer features)."""
        return 0

    @property
    def layer_source(self) -> str:
        """What layer features depend on (an encoder whose head sits on frozen towers names
        the towers, so every head over them shares one stored feature set)."""
        return self.spec

    def image_layer_features(
        self, images: Sequence[ImageInput], layers: Sequence[int]
    ) -> LayerFeatures:
        """Token features of ``layers`` of the image tower for a batch (see
        :mod:`mmret.layers` for numbering and shapes)."""
        chosen = resolve_layers(layers, self._layer_count(self.image_layer_count), "image")
        with torch.inference_mode():
            return self._image_layers([self.load(image) for image in images], chosen)

    def text_layer_features(self, texts: Sequence[str], layers: Sequence[int]) -> LayerFeatures:
        """Token features of ``layers`` of the text tower for a batch of texts."""
        chosen = resolve_layers(layers, self._layer_count(self.text_layer_count), "text")
        with torch.inference_mode():
            return self._text_layers([text[:MAX_TEXT_CHARS] for text in texts], chosen)

    def _layer_count(self, count: int) -> int:
        if count == 0:
            raise InputError(f"encoder {self.spec!r} exposes no layer features")
        return count

    def _image_layers(self, images: list[Image.Image], layers: tuple[int, ...]) -> LayerFeatures:
        raise InputError(f"encoder {self.spec!r} exposes no layer features")

    def _text_layers(self, texts: list[str], layers: tuple[int, ...]) -> LayerFeatures:
        raise InputError(f"encoder {self.spec!r} exposes no layer features")

    def load(self, image: ImageInput) -> Image.Image:
        """Decode an image input at the resolution this encoder needs."""
        return load_image(image, draft_size=2 * self.image_size)

    def encode_images(
        self, images: Sequence[ImageInput], *, show_progress: bool = False
    ) -> np.ndarray:
        """``(N, dim)`` float32 unit vectors for images given as paths, bytes or PIL images."""
        return self._run(images, self._embed_image_batch, "Encoding images", show_progress)

    def encode_texts(self, texts: Sequence[str], *, show_progress: bool = False) -> np.ndarray:
        """``(N, dim)`` float32 unit vectors for texts."""
        return self._run(texts, self._embed_text_batch, "Encoding texts", show_progress)

    def encode(self, contents: Sequence[Content], *, show_progress: bool = False) -> np.ndarray:
        """``(N, dim)`` unit vectors for items or queries with a text, an image, or both."""
        out = np.zeros((len(contents), self.dim), dtype=np.float32)
        images = {i: c.image for i, c in enumerate(contents) if c.image is not None}
        texts = {i: c.text for i, c in enumerate(contents) if c.text is not None}
        if images:
            out[list(images)] += self.encode_images(
                list(images.values()), show_progress=show_progress
            )
        if texts:
            out[list(texts)] += self.encode_texts(list(texts.values()), show_progress=show_progress)
        return self.normalise(out)

    def _embed_image_batch(self, batch: Sequence[ImageInput]) -> torch.Tensor:
        return self.embed_images([self.load(image) for image in batch])

    def _embed_text_batch(self, batch: Sequence[str]) -> torch.Tensor:
        # Every supported text tower reads at most a few hundred tokens; cutting first keeps a
        # 10 MB caption from costing the tokenizer seconds and gigabytes for nothing.
        return self.embed_texts([text[:MAX_TEXT_CHARS] for text in batch])

    def _run(
        self,
        values: Sequence[T],
        embed: Callable[[Sequence[T]], torch.Tensor],
        label: str,
        show: bool,
    ) -> np.ndarray:
        if len(values) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        chunks = []
        n_batches = -(-len(values) // self.batch_size)
        batches = progress(
            batched(values, self.batch_size), total=n_batches, description=label, enabled=show
        )
        with torch.inference_mode():
            for batch in batches:
                chunks.append(embed(batch).float().cpu().numpy())
        return self.normalise(np.concatenate(chunks))


class SharesLayers(Encoder):
    """An encoder whose layer features are another encoder's (``layers_of``): a head on frozen
    towers, or embeddings refined after the fact."""

    layers_of: Encoder

    @property
    def layer_source(self) -> str:
        return self.layers_of.layer_source

    @property
    def image_layer_count(self) -> int:
        return self.layers_of.image_layer_count

    @property
    def text_layer_count(self) -> int:
        return self.layers_of.text_layer_count

    def _image_layers(self, images: list[Image.Image], layers: tuple[int, ...]) -> LayerFeatures:
        return self.layers_of._image_layers(images, layers)

    def _text_layers(self, texts: list[str], layers: tuple[int, ...]) -> LayerFeatures:
        return self.layers_of._text_layers(texts, layers)


class HeadOnBackbone(SharesLayers):
    """An encoder whose trained head reads another encoder's (its backbone's) layer features:
    its layers are the backbone's, and it refuses a backbone whose layers have changed."""

    def __init__(self, backbone: Encoder, what: str, backbone_spec: str, trained_on: str) -> None:
        if trained_on and backbone.layer_source != trained_on:
            raise InputError(
                f"{what} was trained on the layers of {trained_on!r}, but its backbone "
                f"{backbone_spec!r} now gives those of {backbone.layer_source!r}"
            )
        self.backbone = backbone
        self.layers_of = backbone
        self.image_size = backbone.image_size
