"""Refining embeddings with a memory: search it, gather the partners, fuse.

RECO refines both sides, and so does mmret: an index built with a memory stores refined item
vectors, and its queries are refined with the same memory and fusion before searching. The index
manifest records which memory (its identity checksum and path), which fusion (its weights'
checksum) and which options it was built with; opening it with any other refinement is refused,
because refined and unrefined vectors, or vectors refined by different memories, are not
comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from mmret._config import JsonConfig
from mmret.encoders.base import Encoder, SharesLayers
from mmret.errors import IndexFormatError, InputError
from mmret.heads.reco import Fusion, load_fusion
from mmret.late_interaction import l2_normalise
from mmret.memory.store import Memory, Modality, check_modality, other

SEARCH_MODES = ("uni", "cross")
_BATCH = 1024


@dataclass(frozen=True)
class RefinerOptions(JsonConfig):
    """``k`` neighbours; ``search``: "uni" (an image finds memory images and takes their
    texts; RECO's choice) or "cross" (an image finds memory texts directly); pairs whose
    same-modality similarity to the query is >= ``threshold`` are never used (the query itself
    and its near-duplicates)."""

    k: int = 10
    search: Literal["uni", "cross"] = "uni"
    threshold: float = 0.95

    def __post_init__(self) -> None:
        if self.k < 1:
            raise InputError(f"memory k must be at least 1, got {self.k}")
        if self.search not in SEARCH_MODES:
            raise InputError(f"memory search must be 'uni' or 'cross', got {self.search!r}")
        if not -1.0 < self.threshold <= 1.0:
            raise InputError(f"near-duplicate threshold must be in (-1, 1], got {self.threshold}")


class Refiner:
    """A memory, a fusion and options: turns ``(N, D)`` embeddings into refined ones."""

    def __init__(
        self,
        memory: Memory,
        fusion: Fusion,
        options: RefinerOptions | None = None,
        *,
        fusion_spec: str = "transformer",
    ) -> None:
        self.memory = memory
        self.fusion = fusion
        self.options = options or RefinerOptions()
        self.fusion_spec = fusion_spec

    @property
    def encoder(self) -> str:
        """The spec of the encoder whose embeddings this refines (the memory's)."""
        return self.memory.manifest.encoder

    def refine(
        self, vectors: np.ndarray, modality: str, *, exclude: np.ndarray | None = None
    ) -> np.ndarray:
        """Refined ``(N, D)`` unit vectors of ``(N, D)`` ``modality`` embeddings.

        ``exclude (N,)`` optionally names one memory row per vector never to use (-1: none).
        """
        modality = check_modality(modality)
        vectors = l2_normalise(np.asarray(vectors, dtype=np.float32))
        out = np.empty_like(vectors)
        for start in range(0, len(vectors), _BATCH):
            end = start + _BATCH
            part = None if exclude is None else exclude[start:end]
            out[start:end] = self._refine_batch(vectors[start:end], modality, part)
        return out

    def _refine_batch(
        self, vectors: np.ndarray, modality: Modality, exclude: np.ndarray | None
    ) -> np.ndarray:
        found = self.memory.neighbours(
            vectors,
            modality,
            self.options.k,
            search=self.options.search,
            threshold=self.options.threshold,
            exclude=exclude,
        )
        return self.fuse_rows(vectors, modality, found.rows)

    def fuse_rows(self, vectors: np.ndarray, modality: str, rows: np.ndarray) -> np.ndarray:
        """Refined ``(N, D)`` unit vectors of unit ``vectors`` given the memory ``rows (N, k)``
        of their neighbours (-1: none), as :meth:`refine` finds them; for studies that reuse
        one neighbour search across fusions and smaller k."""
        modality = check_modality(modality)
        gathered = self.memory.gather(rows, other(modality))
        with torch.inference_mode():
            refined = self.fusion.fuse(
                torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)),
                torch.from_numpy(gathered),
                torch.from_numpy(rows >= 0),
                modality,
            )
        return l2_normalise(refined.float().numpy())

    def label(self) -> str:
        """How a report names the refinement: the memory, its fusion and options."""
        options = self.options
        return (
            f"memory {self.memory.folder.name} ({self.fusion.identity()['kind']}, "
            f"k={options.k}, {options.search}-modal search)"
        )

    def record(self) -> dict[str, Any]:
        """What an index built with this refiner stores in its manifest."""
        return {
            "memory": self.memory.identity,
            "memory_path": str(self.memory.folder.resolve()),
            "fusion": self.fusion.identity(),
            "fusion_spec": self.fusion_spec,
            **self.options.to_dict(),
        }

    def check_encoder(self, spec: str) -> None:
        """Refuse embeddings of another encoder than the memory's: their spaces differ."""
        if spec != self.encoder:
            raise InputError(
                f"the memory {self.memory.folder} was built with encoder {self.encoder!r}; it "
                f"cannot refine embeddings of {spec!r}"
            )

    def wrap(self, encoder: Encoder) -> Encoder:
        """``encoder`` with every image and text embedding refined."""
        self.check_encoder(encoder.spec)
        return RefinedEncoder(encoder, self)

    def close(self) -> None:
        self.memory.close()


class RefinedEncoder(SharesLayers):
    """An encoder whose image and text embeddings pass through a :class:`Refiner`.

    Its ``spec`` is the base encoder's (an index records the refinement separately); image+text
    inputs combine the two refined views as any encoder combines its plain ones. Layer features
    are the base encoder's: refining touches embeddings only.
    """

    def __init__(self, base: Encoder, refiner: Refiner) -> None:
        self.base = base
        self.layers_of = base
        self.refiner = refiner
        self.spec = base.spec
        self.dim = base.dim
        self.image_size = base.image_size
        self.batch_size = base.batch_size

    def load(self, image: Any) -> Image.Image:
        return self.base.load(image)

    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        plain = self.base.embed_images(images).float().cpu().numpy()
        return torch.from_numpy(self.refiner.refine(plain, "image"))

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        plain = self.base.embed_texts(texts).float().cpu().numpy()
        return torch.from_numpy(self.refiner.refine(plain, "text"))


def load_refiner(
    memory: str | Path | Memory,
    fusion: str | Path = "transformer",
    *,
    k: int = RefinerOptions.k,
    search: str = RefinerOptions.search,
    threshold: float = RefinerOptions.threshold,
) -> Refiner:
    """Open a memory folder (or use an opened :class:`Memory`) with a fusion: ``"transformer"``
    (the trained one shipped for the memory's encoder), ``"mean"`` or a trained fusion folder."""
    options = RefinerOptions(k, "cross" if search == "cross" else "uni", threshold)
    if search not in SEARCH_MODES:
        raise InputError(f"memory search must be 'uni' or 'cross', got {search!r}")
    opened = memory if isinstance(memory, Memory) else Memory.open(memory)
    try:
        loaded = load_fusion(fusion, opened.manifest.encoder)
    except BaseException:
        if not isinstance(memory, Memory):
            opened.close()
        raise
    spec = fusion if fusion in ("transformer", "mean") else str(Path(fusion).resolve())
    return Refiner(opened, loaded, options, fusion_spec=str(spec))


def _comparable(record: dict[str, Any]) -> dict[str, Any]:
    """The parts of a refiner record that change the vectors (not where the memory lies)."""
    return {
        key: value for key, value in record.items() if key not in ("memory_path", "fusion_spec")
    }


def refiner_for_index(
    folder: Path, recorded: dict[str, Any] | None, given: Refiner | None
) -> Refiner | None:
    """The refiner an index at ``folder`` must be used with, checking a ``given`` one.

    An index built with a memory reopens its memory from the recorded path when none is given.
    """
    if recorded is None:
        if given is not None:
            raise InputError(
                f"{folder} was built without a memory: its vectors are not refined, so it "
                "cannot be searched with refined queries (drop the memory, or index the "
                "collection again with it)"
            )
        return None
    if given is None:
        path = Path(recorded["memory_path"])
        if not (path / "memory.json").is_file():
            raise IndexFormatError(
                f"{folder} was built with the memory at {path}, which is gone; pass that "
                "memory again (memory=... / --memory DIR) to search it"
            )
        given = load_refiner(
            path,
            recorded["fusion_spec"],
            k=recorded["k"],
            search=recorded["search"],
            threshold=recorded["threshold"],
        )
    mine, theirs = _comparable(recorded), _comparable(given.record())
    if mine != theirs:
        differ = ", ".join(
            f"{key} {mine.get(key)!r} (given {theirs.get(key)!r})"
            for key in sorted(set(mine) | set(theirs))
            if mine.get(key) != theirs.get(key)
        )
        raise InputError(
            f"{folder} was built with memory {recorded['memory']} "
            f"({recorded['memory_path']}) and cannot be searched with memory "
            f"{given.memory.identity} ({given.memory.folder}) as given: {differ}. Vectors "
            "refined differently are not comparable; search with the index's own memory, or "
            "index the collection again with the new one"
        )
    return given
