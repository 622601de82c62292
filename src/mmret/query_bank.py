"""Query-bank normalisation: fewer hubs in the first stage's hits.

In a joint image-text space some items are "hubs": close to very many queries, they crowd the
top of searches they do not answer. Query-bank normalisation (QB-Norm, Bogolin et al., "Cross
Modal Retrieval with Querybank Normalisation", CVPR 2022) measures how close each item is to a
bank of typical queries and discounts that. We use the log form of its inverted softmax::

    score(q, c) = cos(q, c) - weight * (1 / beta) * log mean_b exp(beta * cos(b, c))

where ``b`` runs over the bank's queries of ``q``'s modality (captions for a text query, images
for an image query). The discount is a constant per item and query modality, so it needs no
retraining and no change to what an index stores: a search rescores the first stage's top
:data:`POOL` candidates by cosine (deeper candidates almost never climb into the top ten) from
their stored vectors.

A bank belongs to one encoder (its vectors are in that space); ``beta`` and ``weight`` are
chosen on dev data by ``mmret train query-bank``. A bank ships for the default model.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from mmret._files import write_atomic
from mmret.errors import IndexFormatError, InputError

#: Candidates by cosine that a search rescores (its ``k`` or rerank depth, if deeper).
POOL = 50
_CHUNK = 2048
KIND = "query-bank"
CONFIG_FILE = "config.json"
VECTORS_FILE = "bank.safetensors"
SHIPPED = Path(__file__).resolve().parent / "weights"
#: encoder spec -> folder of the bank that ships for it.
SHIPPED_BANKS = {
    "starter-v3": SHIPPED / "query-bank-starter-v3",
    "starter-v4": SHIPPED / "query-bank-starter-v4",
}


@dataclass(frozen=True)
class QueryBank:
    """Bank queries of one encoder, ``text (Bt, D)`` and ``image (Bi, D)`` unit vectors, with
    the inverted softmax's ``beta`` and the discount's ``weight``; ``record`` says how they were
    chosen."""

    encoder: str
    text: np.ndarray
    image: np.ndarray
    beta: float
    weight: float
    record: dict[str, Any] | None = None

    def discount(self, vectors: np.ndarray, modality: str) -> np.ndarray:
        """``(N,)`` what to subtract from the scores of items ``vectors (N, D)`` for a query of
        ``modality`` ("text" or "image"): ``weight`` times their log-mean-exp similarity to
        that modality's bank queries."""
        bank = self._banks[modality]
        items = torch.from_numpy(np.array(vectors, dtype=np.float32, ndmin=2))
        # In torch, not numpy: numpy's OpenBLAS threads spin for ~0.1 s after a product and
        # slowed the next query's encoding (torch's threads) from 66 to 165 ms on 2 cores.
        with torch.inference_mode():
            log_sum = [
                torch.logsumexp(self.beta * (items[start : start + _CHUNK] @ bank.T), dim=1)
                for start in range(0, len(items), _CHUNK)
            ]
            log_mean = torch.cat(log_sum) - math.log(len(bank)) if log_sum else torch.zeros(0)
        discount: np.ndarray = (self.weight * log_mean / self.beta).numpy()
        return discount

    @functools.cached_property
    def _banks(self) -> dict[str, torch.Tensor]:
        """The bank vectors as float32 tensors, made once per bank."""
        return {
            "text": torch.tensor(self.text, dtype=torch.float32),
            "image": torch.tensor(self.image, dtype=torch.float32),
        }

    def offsets(self, image: np.ndarray, text: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The discounts of ``image (N, D)`` items for text queries and of ``text (T, D)``
        items for image queries (``retrieval_metrics(offsets=)``)."""
        return self.discount(image, "text"), self.discount(text, "image")

    def check_encoder(self, spec: str) -> None:
        if spec != self.encoder:
            raise InputError(
                f"the query bank holds {self.encoder!r} vectors; it cannot normalise "
                f"{spec!r} scores"
            )

    def save(self, folder: Path) -> None:
        """Write the bank (float16 vectors) and its settings to ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        save_file(
            {"text": self.text.astype(np.float16), "image": self.image.astype(np.float16)},
            str(folder / VECTORS_FILE),
        )
        config = {"encoder": self.encoder, "beta": self.beta, "weight": self.weight}
        document = {"type": KIND, "config": config, "record": self.record}
        write_atomic(folder / CONFIG_FILE, (json.dumps(document, indent=2) + "\n").encode())


def load_query_bank(folder: str | Path) -> QueryBank:
    """The bank saved in ``folder`` (by ``mmret train query-bank``)."""
    path = Path(folder)
    try:
        document = json.loads((path / CONFIG_FILE).read_text())
        config = document["config"]
        if document.get("type") != KIND:
            raise KeyError("type")
        vectors = load_file(str(path / VECTORS_FILE))
        text, image = (vectors[m].astype(np.float32) for m in ("text", "image"))
        for array in (text, image):
            array.setflags(write=False)  # a shipped bank is shared by every search
    except FileNotFoundError as error:
        raise InputError(f"{path}: not a query bank ({error.filename} is missing)") from None
    except (json.JSONDecodeError, KeyError, TypeError, OSError) as error:
        raise IndexFormatError(f"{path}: not a readable query bank ({error!r})") from None
    return QueryBank(
        str(config["encoder"]),
        text,
        image,
        float(config["beta"]),
        float(config["weight"]),
        document.get("record"),
    )


@functools.cache
def shipped_query_bank(spec: str) -> QueryBank | None:
    """The bank that ships for encoder ``spec``, if one does (read once per process)."""
    folder = SHIPPED_BANKS.get(spec)
    return load_query_bank(folder) if folder is not None and folder.is_dir() else None


def select_query_bank(option: QueryBank | bool, spec: str, refined: bool) -> QueryBank | None:
    """The bank that normalises scores of model ``spec``: for ``option`` True the one that
    ships for it, for False none, or ``option`` itself (a bank of that model). None for
    memory-refined scores (``refined``; a given bank is refused) and for a zero weight, which
    changes nothing."""
    if isinstance(option, QueryBank):
        option.check_encoder(spec)
        if refined:
            raise InputError("a query bank normalises plain cosines, not memory-refined ones")
        return option if option.weight else None
    return shipped_query_bank(spec) if option and not refined else None
