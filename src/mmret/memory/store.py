"""A RECO memory: image-text pairs with both towers' embeddings, searchable by either.

A memory folder holds two ordinary mmret indexes over the same pairs, ``images/`` (each pair's
image vector) and ``texts/`` (its text vector), so nearest-neighbour search uses the index
backends (exact, FAISS) and scales with them; and the same vectors as row-aligned ``.npy``
matrices (memory-mapped), from which the *partner* of every neighbour found is gathered in
O(k). ``memory.json`` names the encoder and the memory's identity: a checksum of the pairs' ids
and vectors, which indexes built with the memory record.

A pair is one record of the source manifest that has an image and at least one caption; with
several captions its text vector is the renormalised mean of theirs, so every image appears
once (k neighbours are k different photos, not one photo's five captions).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from mmret._closing import Closing
from mmret._config import JsonConfig
from mmret._files import build_folder
from mmret._version import __version__
from mmret.encoders import DEFAULT_MODEL, Encoder, load_encoder
from mmret.errors import IndexFormatError, InputError
from mmret.index.folder import IndexFolder, refuse_existing
from mmret.index.manifest import IndexManifest
from mmret.ingest.pairs import read_pairs
from mmret.ingest.report import SkipReport
from mmret.items import Item
from mmret.late_interaction import l2_normalise
from mmret.memory.pair_embeddings import embed_pair_set, first_captions

Modality = Literal["image", "text"]
MODALITIES: tuple[Modality, Modality] = ("image", "text")
FORMAT = "mmret-memory"
FORMAT_VERSION = 1
MEMORY_FILE = "memory.json"
IDS_FILE = "ids.json"
INDEX_FOLDERS: dict[Modality, str] = {"image": "images", "text": "texts"}
#: Neighbours fetched beyond k, so that dropping the query's own pair and its near-duplicates
#: rarely needs a second search.
SEARCH_MARGIN = 8
_ADD_CHUNK = 4096


def other(modality: Modality) -> Modality:
    return "text" if modality == "image" else "image"


def check_modality(modality: str) -> Modality:
    if modality not in MODALITIES:
        raise InputError(f"modality must be 'image' or 'text', got {modality!r}")
    return "image" if modality == "image" else "text"


@dataclass(frozen=True)
class MemoryManifest(JsonConfig):
    """What a memory folder holds: ``pairs`` pairs embedded by ``encoder`` into ``dim``."""

    encoder: str
    dim: int
    pairs: int
    identity: str
    source: str
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    mmret_version: str = __version__


def memory_identity(encoder: str, ids: Sequence[str], image: np.ndarray, text: np.ndarray) -> str:
    """A checksum of the encoder spec, the pairs' ids and both ``(N, D)`` vector matrices."""
    digest = hashlib.sha256(encoder.encode())
    digest.update("\0".join(ids).encode())
    digest.update(np.ascontiguousarray(image, dtype=np.float32).tobytes())
    digest.update(np.ascontiguousarray(text, dtype=np.float32).tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Neighbours:
    """``rows (Q, k)`` memory rows found per query (-1 where fewer than k remained) and their
    ``scores (Q, k)`` (similarity to the query in the searched index)."""

    rows: np.ndarray
    scores: np.ndarray

    @property
    def valid(self) -> np.ndarray:
        """``(Q, k)`` bool: which entries are real neighbours."""
        found: np.ndarray = self.rows >= 0
        return found


class Memory(Closing):
    """An opened memory folder (read-only). Close it, or use it as a context manager."""

    def __init__(self, folder: Path, manifest: MemoryManifest) -> None:
        self.folder = folder
        self.manifest = manifest
        self.ids: list[str] = json.loads((folder / IDS_FILE).read_text())
        self.vectors: dict[Modality, np.ndarray] = {
            m: np.load(folder / f"{m}.npy", mmap_mode="r") for m in MODALITIES
        }
        self._row = {id_: row for row, id_ in enumerate(self.ids)}
        self.indexes: dict[Modality, IndexFolder] = {}
        try:
            for modality in MODALITIES:
                self.indexes[modality] = IndexFolder.open(
                    folder / INDEX_FOLDERS[modality], readonly=True
                )
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(cls, folder: str | Path) -> Memory:
        folder = Path(folder)
        path = folder / MEMORY_FILE
        if not path.is_file():
            raise InputError(
                f"{folder}: not an mmret memory (no {MEMORY_FILE}; build one with "
                "`mmret memory build MANIFEST --out DIR`)"
            )
        try:
            data = json.loads(path.read_text())
            manifest = MemoryManifest.from_dict(data)
        except (json.JSONDecodeError, TypeError) as error:
            raise IndexFormatError(f"{path}: corrupt memory manifest ({error})") from None
        if manifest.format != FORMAT or manifest.format_version > FORMAT_VERSION:
            raise IndexFormatError(
                f"{path}: memory format {manifest.format_version} is not one this mmret reads"
            )
        return cls(folder, manifest)

    def close(self) -> None:
        for index in self.indexes.values():
            index.close()
        self.indexes = {}

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def identity(self) -> str:
        return self.manifest.identity

    def rows_of(self, ids: Sequence[str]) -> np.ndarray:
        """``(N,)`` memory row of each id, -1 for ids not in the memory."""
        return np.asarray([self._row.get(i, -1) for i in ids], dtype=np.int64)

    def footprint_bytes(self) -> int:
        """Bytes the memory folder takes on disk (both indexes and both matrices)."""
        return sum(f.stat().st_size for f in self.folder.rglob("*") if f.is_file())

    def neighbours(
        self,
        queries: np.ndarray,
        modality: Modality,
        k: int,
        *,
        search: Literal["uni", "cross"] = "uni",
        threshold: float = 0.95,
        exclude: np.ndarray | None = None,
    ) -> Neighbours:
        """The ``k`` nearest pairs of ``(Q, D)`` unit ``queries`` of ``modality``.

        ``search="uni"`` searches the memory's vectors of the query's own modality (an image
        finds images), ``"cross"`` those of the other one (an image finds texts). Never
        returned: a pair whose ``modality`` vector has cosine similarity >= ``threshold`` with
        the query (the query itself and its near-duplicates), and the row ``exclude[q]``
        (``(Q,)``, -1 for none: a training query's own pair).
        """
        if k < 1:
            raise InputError(f"k must be at least 1, got {k}")
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.manifest.dim:
            raise InputError(
                f"queries must have shape (Q, {self.manifest.dim}), got {queries.shape}"
            )
        searched = modality if search == "uni" else other(modality)
        own = self.vectors[modality]
        rows = np.full((len(queries), k), -1, dtype=np.int64)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        excluded = np.full(len(queries), -1) if exclude is None else np.asarray(exclude)
        todo = np.arange(len(queries))
        fetch = k + SEARCH_MARGIN
        while len(todo):
            hits = self.indexes[searched].search(queries[todo], min(fetch, len(self)), None)[0]
            short = []
            for query, found in zip(todo.tolist(), hits, strict=True):
                found_rows = self.rows_of([hit.id for _, hit in found])
                found_scores = np.asarray([hit.score for _, hit in found], dtype=np.float32)
                same = found_scores if search == "uni" else own[found_rows] @ queries[query]
                keep = (same < threshold) & (found_rows != excluded[query])
                kept_rows, kept_scores = found_rows[keep][:k], found_scores[keep][:k]
                rows[query, : len(kept_rows)] = kept_rows
                scores[query, : len(kept_rows)] = kept_scores
                if len(kept_rows) < k and len(found) == fetch:
                    short.append(query)
            todo = np.asarray(short, dtype=np.int64)
            fetch *= 4
        return Neighbours(rows, scores)

    def gather(self, rows: np.ndarray, modality: Modality) -> np.ndarray:
        """``(Q, k, D)`` ``modality`` vectors of memory ``rows (Q, k)``; zeros where -1."""
        flat = rows.reshape(-1)
        out = np.zeros((len(flat), self.manifest.dim), dtype=np.float32)
        present = flat >= 0
        if present.any():
            wanted = flat[present]
            order = np.argsort(wanted)  # sorted reads of a memory map are sequential
            picked = np.empty((len(wanted), self.manifest.dim), dtype=np.float32)
            picked[order] = self.vectors[modality][wanted[order]]
            out[present] = picked
        return out.reshape(*rows.shape, self.manifest.dim)


def build_memory(
    source: str | Path,
    out: str | Path,
    *,
    model: str = DEFAULT_MODEL,
    encoder: Encoder | None = None,
    backend: str = "auto",
    cache_dir: Path | None = None,
    report: SkipReport | None = None,
    show_progress: bool = False,
    max_captions: int | None = None,
) -> Path:
    """Embed the image-caption pairs of ``source`` (a manifest) and write a memory to ``out``.

    Embeddings are cached (``~/.cache/mmret``), so building a memory from a training set that
    was already embedded for training or evaluation costs no encoding. ``max_captions`` keeps
    only the first captions of each entry (None: all).
    """
    out = refuse_existing(Path(out))
    report = report if report is not None else SkipReport()
    pairs = first_captions(read_pairs(source, report), max_captions)
    encoder = encoder or load_encoder(model)
    embedded = embed_pair_set(
        encoder, pairs, cache_dir=cache_dir, report=report, show_progress=show_progress
    )
    captions: list[list[str]] = [[] for _ in embedded.image_ids]
    for text, owner in zip(embedded.texts, embedded.embeddings.text_image.tolist(), strict=True):
        captions[owner].append(text)
    items = [
        Item(id=id_, text="\n".join(texts), image=str(path))
        for id_, path, texts in zip(embedded.image_ids, embedded.image_paths, captions, strict=True)
    ]
    write_memory(
        out,
        encoder,
        items,
        {"image": embedded.embeddings.image, "text": embedded.caption_means()},
        source=str(source),
        backend=backend,
    )
    return out


def write_memory(
    out: Path,
    encoder: Encoder,
    items: Sequence[Item],
    vectors: dict[Modality, np.ndarray],
    *,
    source: str,
    backend: str = "auto",
) -> None:
    """Write a memory of ``items`` (one per pair) with both towers' ``(N, D)`` vectors."""
    if not items:
        raise InputError(f"{source}: no pair with both an image and a text to put in a memory")
    unit = {m: l2_normalise(np.asarray(vectors[m], dtype=np.float32)) for m in MODALITIES}
    ids = [item.id for item in items]
    identity = memory_identity(encoder.spec, ids, unit["image"], unit["text"])
    manifest = MemoryManifest(encoder.spec, encoder.dim, len(items), identity, source)
    out.parent.mkdir(parents=True, exist_ok=True)
    with build_folder(out) as scratch:
        for modality in MODALITIES:
            np.save(scratch / f"{modality}.npy", unit[modality])
            index_folder = scratch / INDEX_FOLDERS[modality]
            IndexFolder.create(
                index_folder,
                IndexManifest(encoder.spec, encoder.dim, backend, token_dim=encoder.token_dim),
            )
            with IndexFolder.open(index_folder) as index:
                for start in range(0, len(items), _ADD_CHUNK):
                    end = start + _ADD_CHUNK
                    index.add_new(items[start:end], unit[modality][start:end])
        (scratch / IDS_FILE).write_text(json.dumps(ids))
        (scratch / MEMORY_FILE).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
