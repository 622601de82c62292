"""Ensembles of single-vector encoders: one vector whose dot product is a weighted sum of cosines.

An ensemble of encoders ``m_i`` with weights ``w_i`` (summing to 1) embeds an input as the
concatenation of ``sqrt(w_i) * unit(m_i(input))``. Both sides being built this way, the dot
product of a query and an item is ``sum_i w_i * cos_i``: the members' scores, averaged. The
vector is unit-norm, so every index backend, filter and query bank serves it unchanged.

``load_encoder("starter-v4")`` is the shipped one (``mmret/weights/starter-v4``: ``starter-v2``
and ``starter-v3``); ``ensemble:DIR`` is one made by ``mmret train ensemble`` (``DIR`` holds
``ensemble.json``: the members' specs and weights, and how dev chose them).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mmret._files import write_atomic
from mmret.encoders.base import Encoder
from mmret.encoders.fingerprint import encoder_fingerprint
from mmret.encoders.registry import ENCODERS, load_encoder
from mmret.errors import InputError

ENSEMBLE_FILE = "ensemble.json"
SHIPPED_ENSEMBLE = Path(__file__).resolve().parent.parent / "weights" / "starter-v4"


@dataclass(frozen=True)
class EnsembleConfig:
    """Member specs and their weights (positive, summing to 1); ``record`` says how they were
    chosen (dev scores by weight)."""

    members: tuple[str, ...]
    weights: tuple[float, ...]
    record: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if len(self.members) < 2 or len(self.members) != len(self.weights):
            raise InputError(
                f"an ensemble needs two or more members, each with a weight; got members "
                f"{list(self.members)} and weights {list(self.weights)}"
            )
        if min(self.weights) < 0 or abs(sum(self.weights) - 1) > 1e-6:
            raise InputError(
                f"ensemble weights must be non-negative and sum to 1, got {list(self.weights)}"
            )

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        data = {"members": list(self.members), "weights": list(self.weights)}
        if self.record is not None:
            data["record"] = self.record
        write_atomic(folder / ENSEMBLE_FILE, json.dumps(data, indent=2).encode())

    @classmethod
    def load(cls, folder: Path) -> EnsembleConfig:
        path = folder / ENSEMBLE_FILE
        if not path.is_file():
            raise InputError(
                f"{folder}: not an ensemble (no {ENSEMBLE_FILE}); make one with "
                "`mmret train ensemble`"
            )
        try:
            data = json.loads(path.read_text())
            return cls(
                tuple(str(spec) for spec in data["members"]),
                tuple(float(weight) for weight in data["weights"]),
                data.get("record"),
            )
        except (ValueError, KeyError, TypeError) as error:
            raise InputError(f"{path}: not a readable ensemble ({error})") from error


class EnsembleEncoder(Encoder):
    """The members' unit embeddings, each scaled by the square root of its weight, side by side."""

    def __init__(self, members: Sequence[Encoder], weights: Sequence[float], spec: str) -> None:
        multi = [member.spec for member in members if member.token_dim is not None]
        if multi:
            raise InputError(f"an ensemble combines single-vector models; {multi} are multi-vector")
        self.members = tuple(members)
        self.weights = tuple(weights)
        self.spec = spec
        self.dim = sum(member.dim for member in members)
        self.image_size = max(member.image_size for member in members)
        self.batch_size = min(member.batch_size for member in members)
        # Caches key on the spec; the members' own weights and the mixture tell this
        # ensemble apart from another saved under the same folder name.

        digest = hashlib.sha256(json.dumps(self.weights).encode())
        for member in members:
            digest.update(encoder_fingerprint(member).encode())
        self.variant = digest.hexdigest()[:12]

    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        return self._combine([member.embed_images(images) for member in self.members])

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        return self._combine([member.embed_texts(texts) for member in self.members])

    def _combine(self, parts: list[torch.Tensor]) -> torch.Tensor:
        scaled = [
            torch.nn.functional.normalize(part.float(), dim=-1) * weight**0.5
            for part, weight in zip(parts, self.weights, strict=True)
        ]
        return torch.cat(scaled, dim=-1)


def ensemble_from(config: EnsembleConfig, spec: str) -> EnsembleEncoder:
    members = [load_encoder(member) for member in config.members]
    return EnsembleEncoder(members, config.weights, spec)


@ENCODERS.register("ensemble")
def load_ensemble(folder: str) -> EnsembleEncoder:
    """``ensemble:DIR``: the members and weights ``mmret train ensemble`` saved in DIR."""
    if not folder:
        raise InputError(
            "ensemble needs a folder: --model ensemble:DIR (see `mmret train ensemble`)"
        )
    path = Path(folder)
    return ensemble_from(EnsembleConfig.load(path), f"ensemble:{path.resolve()}")


@ENCODERS.register("starter-v4")
def load_starter_v4(rest: str) -> EnsembleEncoder:
    """starter-v2 and starter-v3 averaged (weights chosen on Flickr8k dev): the default."""
    if rest:
        raise InputError(
            f"starter-v4 takes no argument, got {rest!r} (an ensemble is --model ensemble:DIR)"
        )
    return ensemble_from(EnsembleConfig.load(SHIPPED_ENSEMBLE), "starter-v4")
