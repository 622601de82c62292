"""Frozen tower features of a manifest's image-caption pairs, cached on disk and memory-mapped.

Extracting features is the slow part of training (minutes on a CPU); the heads train in
seconds on top. The cache is keyed by the towers and by the exact images (path, size, mtime)
and captions, so it is reused across epochs, runs and hyper-parameter searches, and it is
rebuilt when any of them changes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmret._files import default_cache_dir, hash_file_stats, replace_folder
from mmret._progress import progress
from mmret.encoders.base import batched
from mmret.encoders.towers import StarterTowers
from mmret.ingest.images import decode_batch
from mmret.ingest.pairs import PairSet
from mmret.ingest.report import SkipReport

BATCH = 32


@dataclass(frozen=True)
class PairFeatures:
    """Tower features: ``image (N, image_dim)``, ``text (T, text_dim)``, ``text_image (T,)``.

    Memory-mapped from the cache unless images had to be dropped (then in-memory copies).
    """

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
    """Load the cached features of ``pairs`` or extract them (images that fail are dropped,
    with their captions).

    Image and text features are cached apart, each keyed by its own tower, so tower pairs that
    share a tower share its features.
    """
    towers = towers or StarterTowers()
    cache = cache_dir or default_cache_dir()
    image, ok = image_features(
        pairs.images, towers, cache_dir=cache, report=report, show_progress=show_progress
    )
    text = text_features(pairs.texts, towers, cache_dir=cache, show_progress=show_progress)
    if ok.all():
        return PairFeatures(pairs.image_ids, image, text, pairs.text_image)
    new_index = np.cumsum(ok) - 1
    keep_text = ok[pairs.text_image]
    return PairFeatures(
        [i for i, keep in zip(pairs.image_ids, ok, strict=True) if keep],
        np.asarray(image[ok]),
        np.asarray(text[keep_text]),
        new_index[pairs.text_image[keep_text]],
    )


def image_features(
    images: list[Path],
    towers: StarterTowers,
    *,
    cache_dir: Path | None = None,
    report: SkipReport | None = None,
    show_progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``(N, image_dim)`` memory-mapped image-tower features of ``images``, cached, and the
    ``(N,)`` mask of those that decoded (the others' rows are zero)."""
    key = image_key(towers.pair.image.name, images)
    folder = (cache_dir or default_cache_dir()) / f"image-{key}"
    if not (folder / "done.json").is_file():
        with replace_folder(folder) as scratch:
            _extract_images(images, scratch, towers, report or SkipReport(), show_progress)
    features: np.ndarray = np.load(folder / "image.npy", mmap_mode="r")
    return features, np.load(folder / "ok.npy")


def text_features(
    texts: list[str],
    towers: StarterTowers,
    *,
    cache_dir: Path | None = None,
    show_progress: bool = False,
) -> np.ndarray:
    """``(T, text_dim)`` memory-mapped text-tower features of ``texts``, cached."""
    digest = hashlib.sha256(towers.pair.text.name.encode())
    digest.update("\n".join(texts).encode())
    folder = (cache_dir or default_cache_dir()) / f"text-{digest.hexdigest()[:24]}"
    if not (folder / "done.json").is_file():
        with replace_folder(folder) as scratch:
            _extract_texts(texts, scratch, towers, show_progress)
    features: np.ndarray = np.load(folder / "text.npy", mmap_mode="r")
    return features


def image_key(tower: str, images: list[Path]) -> str:
    digest = hashlib.sha256(tower.encode())
    hash_file_stats(digest, images)
    return digest.hexdigest()[:24]


def _extract_images(
    images: list[Path], scratch: Path, towers: StarterTowers, report: SkipReport, show: bool
) -> None:
    out = np.lib.format.open_memmap(
        scratch / "image.npy", mode="w+", dtype=np.float32, shape=(len(images), towers.image_dim)
    )
    ok = np.ones(len(images), dtype=bool)
    n_batches = -(-len(images) // BATCH)
    start = 0
    for batch in progress(
        batched(images, BATCH), total=n_batches, description="Image features", enabled=show
    ):
        decoded, positions = decode_batch(batch, report, draft_size=2 * towers.image_size)
        rows = [start + p for p in positions]
        ok[start : start + len(batch)] = False
        ok[rows] = True
        if decoded:
            out[rows] = towers.image_features(decoded).numpy()
        start += len(batch)
    out.flush()
    np.save(scratch / "ok.npy", ok)
    (scratch / "done.json").write_text(json.dumps({"tower": towers.pair.image.name}))


def _extract_texts(texts: list[str], scratch: Path, towers: StarterTowers, show: bool) -> None:
    out = np.lib.format.open_memmap(
        scratch / "text.npy", mode="w+", dtype=np.float32, shape=(len(texts), towers.text_dim)
    )
    start = 0
    n_batches = -(-len(texts) // (4 * BATCH))
    for batch in progress(
        batched(texts, 4 * BATCH), total=n_batches, description="Text features", enabled=show
    ):
        out[start : start + len(batch)] = towers.text_features(list(batch)).numpy()
        start += len(batch)
    out.flush()
    (scratch / "done.json").write_text(json.dumps({"tower": towers.pair.text.name}))
