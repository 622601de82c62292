"""Token features kept beside an index for reranking, memory-mapped and read just in time.

An index created with token features (``manifest.token_features``, a
:class:`~mmret.reranker.TokenFeatureSpec`) keeps, in ``tokens/``:

* ``image.f16``: every item's image tokens (its map pooled to the grid), raw float16 rows of
  ``image_dim``, one item after the other;
* ``text.f16``: every item's text tokens, raw float16 rows of ``text_dim``.

Both files only grow. Which rows are an item's is recorded in the ``tokens`` table of
``items.sqlite`` (``key, image_row, image_count, text_row, text_count, digest``), written in the
same transaction as the item and its vector; the digest is a hash of the item's token bytes.
The bytes are appended and flushed to disk *before* that transaction commits, so a crash at any
moment leaves every committed item with whole features, and at worst some bytes at the end of a
file that no item refers to (a later append starts after them; ``mmret check`` mentions them).
Removing an item deletes its row in the removal's transaction; its bytes stay until the files
are rebuilt. Reading maps the files (``numpy.memmap``) and copies only the candidates' rows, so
reranking never holds the collection's features in memory.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmret.heads.cross_encoder import SideTokens
from mmret.reranker import TokenFeatureSpec

TOKENS_DIR = "tokens"
MODALITIES = ("image", "text")
TABLE = (
    "CREATE TABLE IF NOT EXISTS tokens (key INTEGER PRIMARY KEY, image_row INTEGER NOT NULL, "
    "image_count INTEGER NOT NULL, text_row INTEGER NOT NULL, text_count INTEGER NOT NULL, "
    "digest TEXT NOT NULL)"
)


@dataclass(frozen=True)
class TokenRef:
    """Where an item's tokens lie: rows ``image_row:image_row+image_count`` of ``image.f16``
    and likewise in ``text.f16``, and the digest of their bytes."""

    image_row: int
    image_count: int
    text_row: int
    text_count: int
    digest: str

    def as_row(self, key: int) -> tuple[int, int, int, int, int, str]:
        return (key, self.image_row, self.image_count, self.text_row, self.text_count, self.digest)


def token_digest(image: bytes, text: bytes) -> str:
    digest = hashlib.blake2b(image, digest_size=8)
    digest.update(b"\0")
    digest.update(text)
    return digest.hexdigest()


class TokenFiles:
    """The two append-only files of an index's token features."""

    def __init__(self, folder: Path, spec: TokenFeatureSpec) -> None:
        self.folder = folder / TOKENS_DIR
        self.spec = spec
        self.widths = {"image": spec.image_dim, "text": spec.text_dim}
        self._maps: dict[str, np.ndarray] = {}

    def path(self, modality: str) -> Path:
        return self.folder / f"{modality}.f16"

    def rows_on_disk(self, modality: str) -> int:
        """Whole rows in a file (0 when it is missing)."""
        try:
            size = self.path(modality).stat().st_size
        except FileNotFoundError:
            return 0
        return size // (2 * self.widths[modality])

    def append(self, side: SideTokens) -> list[TokenRef]:
        """Write each input's real tokens at the end of the files and flush them to disk;
        returns where they lie (for the ``tokens`` rows the caller commits next)."""
        self.folder.mkdir(exist_ok=True)
        parts = {
            "image": _real_rows(side.image, side.image_mask),
            "text": _real_rows(side.text, side.text_mask),
        }
        starts = {m: self._append(m, [block for block in parts[m]]) for m in MODALITIES}
        refs = []
        offsets = {m: starts[m] for m in MODALITIES}
        for image, text in zip(parts["image"], parts["text"], strict=True):
            refs.append(
                TokenRef(
                    offsets["image"],
                    len(image),
                    offsets["text"],
                    len(text),
                    token_digest(image.tobytes(), text.tobytes()),
                )
            )
            offsets["image"] += len(image)
            offsets["text"] += len(text)
        return refs

    def _append(self, modality: str, blocks: list[np.ndarray]) -> int:
        """Append rows; returns the first one's number. A partial row left by a crash is
        completed with zeros first, so rows stay aligned."""
        row_bytes = 2 * self.widths[modality]
        with self.path(modality).open("ab") as handle:
            size = handle.seek(0, os.SEEK_END)
            if size % row_bytes:
                handle.write(b"\0" * (row_bytes - size % row_bytes))
                size += row_bytes - size % row_bytes
            for block in blocks:
                handle.write(block.tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        return size // row_bytes

    def rows(self, modality: str, start: int, count: int) -> np.ndarray:
        """``(count, width)`` float16 view of rows of a file (mapped again when it has grown)."""
        if count == 0:
            return np.zeros((0, self.widths[modality]), dtype=np.float16)
        mapped = self._maps.get(modality)
        if mapped is None or start + count > len(mapped):
            total = self.rows_on_disk(modality)
            if start + count > total:
                raise IndexError(f"{self.path(modality)} holds {total} rows, not {start + count}")
            width = self.widths[modality]
            mapped = np.memmap(self.path(modality), np.float16, "r", shape=(total, width))
            self._maps[modality] = mapped
        return mapped[start : start + count]

    def item_bytes(self, ref: TokenRef) -> tuple[bytes, bytes]:
        """The raw bytes of an item's image and text tokens (for checking its digest)."""
        return (
            self.rows("image", ref.image_row, ref.image_count).tobytes(),
            self.rows("text", ref.text_row, ref.text_count).tobytes(),
        )

    def read(self, refs: Sequence[TokenRef]) -> SideTokens:
        """Token features of items, padded per modality with masks (float32)."""
        parts = []
        for modality, field in (("image", "image"), ("text", "text")):
            counts = [getattr(ref, f"{field}_count") for ref in refs]
            longest = max(counts, default=0)
            tokens = np.zeros((len(refs), longest, self.widths[modality]), dtype=np.float32)
            mask = np.zeros((len(refs), longest), dtype=bool)
            for i, ref in enumerate(refs):
                count = counts[i]
                if count:
                    tokens[i, :count] = self.rows(modality, getattr(ref, f"{field}_row"), count)
                    mask[i, :count] = True
            parts.append((torch.from_numpy(tokens), torch.from_numpy(mask)))
        (image, image_mask), (text, text_mask) = parts
        return SideTokens(image, image_mask, text, text_mask)


def _real_rows(tokens: torch.Tensor, mask: torch.Tensor) -> list[np.ndarray]:
    """Each input's real ``(T_i, D)`` tokens as float16 arrays."""
    half = tokens.to(torch.float16)
    return [half[i][mask[i]].numpy() for i in range(len(tokens))]
