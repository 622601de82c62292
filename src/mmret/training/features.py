"""Frozen tower features of a manifest's image-caption pairs, cached on disk and memory-mapped.

Extracting features is the slow part of training (minutes on a CPU); the heads train in
seconds on top. The cache is keyed by the towers and by the exact images (path, size, mtime)
and captions, so it is reused across epochs, runs and hyper-parameter searches, and it is
rebuilt when any of them changes.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmret._files import hash_file_stats, replace_folder
from mmret._progress import progress
from mmret.encoders.base import batched
from mmret.encoders.towers import IMAGE_SIZE, TOWERS, StarterTowers
from mmret.errors import InputError
from mmret.ingest.images import decode_batch
from mmret.ingest.report import SkipReport
from mmret.ingest.sources import read_records

BATCH = 32


def default_cache_dir() -> Path:
    return Path(os.environ.get("MMRET_CACHE", Path.home() / ".cache" / "mmret")) / "features"


@dataclass(frozen=True)
class PairSet:
    """Image-caption pairs: unique images, every caption, and the image each caption describes."""

    image_ids: list[str]
    images: list[Path]
    texts: list[str]
    text_image: np.ndarray  # (T,) int64 index into ``images``

    def fingerprint(self) -> str:
        digest = hashlib.sha256(TOWERS.encode())
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


@dataclass(frozen=True)
class PairFeatures:
    """Memory-mapped tower features: ``image (N, 1280)``, ``text (T, 384)``, ``text_image (T,)``."""

    image_ids: list[str]
    image: np.ndarray
    text: np.ndarray
    text_image: np.ndarray


def pair_features(
    pairs: PairSet,
    *,
    cache_dir: Path | None = None,
    towers: StarterTowers | None = None,
    report: SkipReport | None = None,
    show_progress: bool = False,
) -> PairFeatures:
    """Load the cached features of ``pairs`` or extract them (images that fail are dropped)."""
    folder = (cache_dir or default_cache_dir()) / pairs.fingerprint()
    if not (folder / "done.json").is_file():
        with replace_folder(folder) as scratch:
            _extract(
                pairs, scratch, towers or StarterTowers(), report or SkipReport(), show_progress
            )
    ids = json.loads((folder / "done.json").read_text())["image_ids"]
    return PairFeatures(
        ids,
        np.load(folder / "image.npy", mmap_mode="r"),
        np.load(folder / "text.npy", mmap_mode="r"),
        np.load(folder / "text_image.npy"),
    )


def _extract(
    pairs: PairSet, scratch: Path, towers: StarterTowers, report: SkipReport, show: bool
) -> None:
    image_out = np.lib.format.open_memmap(
        scratch / "image.npy", mode="w+", dtype=np.float32, shape=(len(pairs.images), 1280)
    )
    ok = np.ones(len(pairs.images), dtype=bool)
    n_batches = -(-len(pairs.images) // BATCH)
    start = 0
    for batch in progress(
        batched(pairs.images, BATCH), total=n_batches, description="Image features", enabled=show
    ):
        decoded, positions = decode_batch(batch, report, draft_size=2 * IMAGE_SIZE)
        rows = [start + p for p in positions]
        ok[start : start + len(batch)] = False
        ok[rows] = True
        if decoded:
            image_out[rows] = towers.image_features(decoded).numpy()
        start += len(batch)
    text_out = np.lib.format.open_memmap(
        scratch / "text.npy", mode="w+", dtype=np.float32, shape=(len(pairs.texts), 384)
    )
    start = 0
    n_batches = -(-len(pairs.texts) // (4 * BATCH))
    text_batches = batched(pairs.texts, 4 * BATCH)
    for texts in progress(text_batches, total=n_batches, description="Text features", enabled=show):
        text_out[start : start + len(texts)] = towers.text_features(list(texts)).numpy()
        start += len(texts)
    image_out.flush()
    text_out.flush()
    if not ok.all():
        _drop_failed_images(scratch, ok, pairs)
    else:
        np.save(scratch / "text_image.npy", pairs.text_image)
    kept_ids = [i for i, keep in zip(pairs.image_ids, ok, strict=True) if keep]
    (scratch / "done.json").write_text(json.dumps({"towers": TOWERS, "image_ids": kept_ids}))


def _drop_failed_images(scratch: Path, ok: np.ndarray, pairs: PairSet) -> None:
    """Rewrite the arrays without images that failed to decode, and without their captions."""
    new_index = np.cumsum(ok) - 1
    keep_text = ok[pairs.text_image]
    image = np.load(scratch / "image.npy")[ok]
    text = np.load(scratch / "text.npy")[keep_text]
    np.save(scratch / "image.npy", image)
    np.save(scratch / "text.npy", text)
    np.save(scratch / "text_image.npy", new_index[pairs.text_image[keep_text]])
