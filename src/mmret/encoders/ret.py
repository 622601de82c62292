"""ReT: latent-token fusion of several layers of both towers, scored by MaxSim (``ret:DIR``).

``load_encoder("ret")`` uses the model shipped in ``mmret/weights/ret``; ``ret:DIR`` one trained
by ``mmret train ret``. The encoder is the document side (ReT-D): it is what an index stores.
:meth:`RetEncoder.for_queries` gives the query side (ReT-Q), which search and evaluation use for
queries. An embedding row is the ``T`` unit tokens flattened (``dim = T * token_dim``, with
``token_dim`` set, see :mod:`mmret.late_interaction`).

Unlike a single-vector encoder, an image+text input is encoded jointly: the latent tokens read
both towers' layers at once, rather than the sum of two separate embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmret._progress import progress
from mmret.encoders.base import Content, Encoder, HeadOnBackbone, batched
from mmret.encoders.registry import ENCODERS, load_encoder
from mmret.errors import InputError
from mmret.heads.ret import RetModel
from mmret.layers import LayerFeatures

SHIPPED_RET = Path(__file__).resolve().parent.parent / "weights" / "ret"


class RetEncoder(HeadOnBackbone):
    """One side of a ReT model over its backbone's layer features (documents unless ``query``)."""

    def __init__(self, model: RetModel, spec: str, backbone: Encoder, *, query: bool) -> None:
        config = model.config
        super().__init__(backbone, "ReT model", config.backbone, config.layer_source)
        self.model = model.eval()
        self.tower = model.side(query)
        self.query = query
        self.spec = spec
        self.variant = "query" if query else ""
        self.dim = config.dim
        self.token_dim = config.token_dim
        self._other: RetEncoder | None = None

    def for_queries(self) -> Encoder:
        if self.query:
            return self
        if self._other is None:
            self._other = RetEncoder(self.model, self.spec, self.backbone, query=True)
        return self._other

    def _image_features(self, images: Sequence[Image.Image]) -> LayerFeatures:
        return self.backbone.image_layer_features(images, self.model.config.image_layers)

    def _text_features(self, texts: Sequence[str]) -> LayerFeatures:
        return self.backbone.text_layer_features(texts, self.model.config.text_layers)

    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        tokens: torch.Tensor = self.tower(self._image_features(images), None)
        return tokens.flatten(1)

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        tokens: torch.Tensor = self.tower(None, self._text_features(texts))
        return tokens.flatten(1)

    def embed_pairs(self, images: list[Image.Image], texts: list[str]) -> torch.Tensor:
        """``(B, dim)`` joint embeddings of image+text inputs (``images[i]`` with ``texts[i]``)."""
        tokens: torch.Tensor = self.tower(self._image_features(images), self._text_features(texts))
        return tokens.flatten(1)

    def encode(self, contents: Sequence[Content], *, show_progress: bool = False) -> np.ndarray:
        """``(N, dim)`` flattened unit tokens; image+text inputs are encoded jointly."""
        out = np.zeros((len(contents), self.dim), dtype=np.float32)
        both = [i for i, c in enumerate(contents) if c.image is not None and c.text is not None]
        images = [i for i, c in enumerate(contents) if c.image is not None and c.text is None]
        texts = [i for i, c in enumerate(contents) if c.image is None and c.text is not None]
        if images:
            out[images] = self.encode_images(
                [contents[i].image for i in images],  # type: ignore[misc]
                show_progress=show_progress,
            )
        if texts:
            out[texts] = self.encode_texts(
                [contents[i].text for i in texts],  # type: ignore[misc]
                show_progress=show_progress,
            )
        if both:
            chunks = []
            batches = batched(both, self.batch_size)
            total = -(-len(both) // self.batch_size)
            with torch.inference_mode():
                for batch in progress(
                    batches, total=total, description="Encoding pairs", enabled=show_progress
                ):
                    decoded = [self.load(contents[i].image) for i in batch]  # type: ignore[arg-type]
                    captions = [str(contents[i].text) for i in batch]
                    chunks.append(self.embed_pairs(decoded, captions).float().numpy())
            out[both] = self.normalise(np.concatenate(chunks))
        return out


@ENCODERS.register("ret")
def load_ret(model_dir: str) -> RetEncoder:
    folder = Path(model_dir) if model_dir else SHIPPED_RET
    if not model_dir and not (folder / "config.json").is_file():
        raise InputError("no ReT model ships with this mmret; train one and use --model ret:DIR")
    spec = f"ret:{folder.resolve()}" if model_dir else "ret"
    model = RetModel.load(folder)
    return RetEncoder(model, spec, load_encoder(model.config.backbone), query=False)
