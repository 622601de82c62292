"""Reranking at search time: the cross-encoder rescoring a first stage's top candidates.

A :class:`Reranker` pairs a trained :class:`~mmret.heads.cross_encoder.CrossEncoder` with the frozen
backbone whose token features it reads. It computes token features of queries (and, at index
time, of items: :meth:`Reranker.features`) and scores a query against candidates whose
features were stored beside the index (:mod:`mmret.index.token_store`).
``load_reranker()`` gives the model shipped in ``mmret/weights/rerank``.

A reranker may also be calibrated for a first stage (``mmret train rerank-calibrate``): its
score then adds that model's first-stage score times a weight chosen on dev data, stored per
first-stage model in ``first_stage.json`` beside the weights. Candidates ranked by a model it
was not calibrated for are scored by the cross-encoder alone.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmret._config import JsonConfig
from mmret._files import write_atomic
from mmret.encoders import Encoder, load_encoder
from mmret.encoders.base import Content
from mmret.errors import IndexFormatError, InputError
from mmret.heads.cross_encoder import CrossEncoder, SideTokens, empty_side, image_grid

SHIPPED_RERANKER = Path(__file__).resolve().parent / "weights" / "rerank"
#: Beside a reranker's weights: the first-stage weight calibrated for each first-stage model.
FIRST_STAGE_FILE = "first_stage.json"


@dataclass(frozen=True)
class FirstStage:
    """The candidates' scores by the first stage that ranked them, and that model's spec."""

    model: str
    scores: np.ndarray


@dataclass(frozen=True)
class TokenFeatureSpec(JsonConfig):
    """Which token features an index stores for reranking: image layer ``image_layer`` of the
    towers ``source`` pooled to ``image_grid`` x ``image_grid`` tokens of ``image_dim``, and
    text layer ``text_layer`` (``text_dim`` wide); ``backbone`` is the encoder spec computing
    them."""

    backbone: str
    source: str
    image_layer: int
    image_grid: int
    image_dim: int
    text_layer: int
    text_dim: int


class Reranker:
    """A cross-encoder and the backbone computing its token features (loaded on first use)."""

    def __init__(
        self,
        model: CrossEncoder,
        backbone: Encoder | None = None,
        first_stage_weights: dict[str, float] | None = None,
    ) -> None:
        config = model.config
        self.model = model.eval()
        self.first_stage_weights = dict(first_stage_weights or {})
        self.spec = TokenFeatureSpec(
            backbone=config.backbone,
            source=config.layer_source,
            image_layer=config.image_layer,
            image_grid=config.image_grid,
            image_dim=config.image_dim,
            text_layer=config.text_layer,
            text_dim=config.text_dim,
        )
        if backbone is not None:
            self._check(backbone)
        self._backbone = backbone

    def _check(self, backbone: Encoder) -> None:
        if backbone.layer_source != self.spec.source:
            raise InputError(
                f"the reranker reads the layers of {self.spec.source!r}, but its backbone "
                f"{backbone.spec!r} gives those of {backbone.layer_source!r}"
            )

    @property
    def backbone(self) -> Encoder:
        if self._backbone is None:
            backbone = load_encoder(self.spec.backbone)
            self._check(backbone)
            self._backbone = backbone
        return self._backbone

    def check_index(self, stored: TokenFeatureSpec | None, folder: Path) -> None:
        """Refuse an index whose stored token features are not the ones this model reads."""
        if stored is None:
            raise InputError(
                f"{folder} stores no token features for reranking; index the collection "
                "again with `mmret index --token-features` (Retriever.create(token_features=))"
            )
        if {**stored.to_dict(), "backbone": ""} != {**self.spec.to_dict(), "backbone": ""}:
            raise InputError(
                f"{folder} stores token features {stored.to_dict()}, but the reranker reads "
                f"{self.spec.to_dict()}"
            )

    def features(self, contents: Sequence[Content]) -> SideTokens:
        """Token features of queries or items (see :func:`token_features`)."""
        return token_features(self.backbone, self.spec, contents)

    def with_backbone(self, backbone: Encoder) -> Reranker:
        """The same reranker computing its token features with ``backbone``'s loaded towers."""
        return Reranker(self.model, backbone, self.first_stage_weights)

    def first_stage_weight(self, model: str) -> float:
        """The weight of first-stage scores by ``model`` (an encoder spec) in the match score:
        the one calibrated for it, or 0 (the cross-encoder alone) for an uncalibrated model."""
        return self.first_stage_weights.get(model, 0.0)

    def score(
        self, query: SideTokens, candidates: SideTokens, first_stage: FirstStage | None = None
    ) -> np.ndarray:
        """``(N,)`` match scores of one query (a side of one input) against ``N`` candidates:
        the cross-encoder's, plus ``first_stage``'s scores of them times the weight calibrated
        for its model."""
        with torch.inference_mode():
            scores: np.ndarray = self.model(query, candidates).float().numpy()
        if first_stage is not None:
            weight = self.first_stage_weight(first_stage.model)
            scores = scores + weight * np.asarray(first_stage.scores, dtype=np.float32)
        return scores


def token_features(
    backbone: Encoder, spec: TokenFeatureSpec, contents: Sequence[Content]
) -> SideTokens:
    """Token features of queries or items with a text, an image or both, as ``spec`` says:
    image maps pooled to the grid, every text token; padded, with masks."""
    side = empty_side(len(contents), spec.image_dim, spec.text_dim)
    with_image = [i for i, c in enumerate(contents) if c.image is not None]
    with_text = [i for i, c in enumerate(contents) if c.text is not None]
    image, image_mask, text, text_mask = side.image, side.image_mask, side.text, side.text_mask
    if with_image:
        found = backbone.image_layer_features(
            [contents[i].image for i in with_image],  # type: ignore[misc]
            [spec.image_layer],
        )
        grid = image_grid(found.tokens[0], spec.image_grid)
        image = torch.zeros(len(contents), grid.shape[1], spec.image_dim)
        image_mask = torch.zeros(len(contents), grid.shape[1], dtype=torch.bool)
        image[with_image], image_mask[with_image] = grid, True
    if with_text:
        found = backbone.text_layer_features(
            [contents[i].text for i in with_text],  # type: ignore[misc]
            [spec.text_layer],
        )
        tokens, mask = found.tokens[0], found.masks[0]
        text = torch.zeros(len(contents), tokens.shape[1], spec.text_dim)
        text_mask = torch.zeros(len(contents), tokens.shape[1], dtype=torch.bool)
        text[with_text], text_mask[with_text] = tokens, mask
    return SideTokens(image, image_mask, text, text_mask)


def load_reranker(folder: str | Path | None = None, backbone: Encoder | None = None) -> Reranker:
    """The reranker trained into ``folder`` (``mmret train rerank``), or the shipped one."""
    path = Path(folder) if folder else SHIPPED_RERANKER
    if not folder and not (path / "config.json").is_file():
        raise InputError("no reranker ships with this mmret; train one with `mmret train rerank`")
    return Reranker(CrossEncoder.load(path), backbone, read_first_stage_weights(path))


def read_first_stage_weights(folder: Path) -> dict[str, float]:
    """The first-stage weights calibrated for the reranker in ``folder`` (none: empty)."""
    path = folder / FIRST_STAGE_FILE
    if not path.is_file():
        return {}
    try:
        weights = json.loads(path.read_text())["weights"]
        return {str(model): float(weight) for model, weight in weights.items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as error:
        raise IndexFormatError(f"{path}: not a first-stage calibration ({error})") from None


def write_first_stage_weight(folder: Path, model: str, weight: float, record: Any) -> None:
    """Record ``weight`` for first-stage ``model`` in ``folder`` (and how it was chosen), keeping
    the weights calibrated for other models; written atomically."""
    path = folder / FIRST_STAGE_FILE
    read_first_stage_weights(folder)  # a damaged file is named, not overwritten
    document: dict[str, Any] = {"weights": {}, "calibration": {}}
    if path.is_file():
        document = json.loads(path.read_text())
    document["weights"][model] = weight
    document.setdefault("calibration", {})[model] = record
    write_atomic(path, (json.dumps(document, indent=2) + "\n").encode())


def first_stage_name(spec: str, refined: bool, query_bank: bool = False) -> str:
    """What a first stage's scores are calibrated under: its model's spec, for scores
    normalised with a query bank ``"SPEC + query bank"``, and for embeddings refined with a
    memory (scores that are not the plain model's) a name no calibration has."""
    if refined:
        return f"{spec} + memory"
    return f"{spec} + query bank" if query_bank else spec
