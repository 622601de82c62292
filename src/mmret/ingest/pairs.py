"""Image-caption pairs read from a manifest: what training, evaluation and memories read."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmret._files import hash_file_stats
from mmret.errors import InputError
from mmret.ingest.report import SkipReport
from mmret.ingest.sources import read_records


@dataclass(frozen=True)
class PairSet:
    """Image-caption pairs: unique images, every caption, and the image each caption describes."""

    image_ids: list[str]
    images: list[Path]
    texts: list[str]
    text_image: np.ndarray  # (T,) int64 index into ``images``

    def fingerprint(self, towers: str) -> str:
        """A key for everything derived from these pairs by ``towers`` (its name is in it)."""
        digest = hashlib.sha256(towers.encode())
        hash_file_stats(digest, self.images)
        digest.update("\n".join(self.texts).encode())
        digest.update(self.text_image.tobytes())
        return digest.hexdigest()[:24]


def read_pairs(manifest: str | Path, report: SkipReport | None = None) -> PairSet:
    """Every record of ``manifest`` that has both an image and at least one caption."""
    ids: list[str] = []
    images: list[Path] = []
    texts: list[str] = []
    owners: list[int] = []
    for record in read_records(manifest, report):
        if record.image is None or not record.captions:
            continue
        for caption in record.captions:
            texts.append(caption)
            owners.append(len(images))
        ids.append(record.id)
        images.append(record.image)
    if not images:
        raise InputError(f"{manifest}: no entry has both an image and a caption")
    return PairSet(ids, images, texts, np.asarray(owners, dtype=np.int64))
