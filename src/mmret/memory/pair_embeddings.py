"""Embedding a manifest's image-caption pairs once, cached, keeping track of which images made it.

A memory and the RECO training data both need the frozen encoder's embeddings of every image and
caption *and* the ids of the images that decoded (to tell a training query's own pair apart in
the memory), which :func:`mmret.cache.embeddings.embed_pairs` does not keep. Images and
captions are cached separately, so the same files embedded for a memory and for training (the
usual case: memory = training set) cost one encoding pass.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmret.cache.embeddings import (
    PairEmbeddings,
    cached_arrays,
    embed_images,
)
from mmret.encoders.base import Encoder
from mmret.encoders.fingerprint import encoder_fingerprint
from mmret.errors import InputError
from mmret.ingest.pairs import PairSet
from mmret.ingest.report import SkipReport
from mmret.late_interaction import l2_normalise


@dataclass(frozen=True)
class EmbeddedPairs:
    """``embeddings`` of the pairs whose image decoded; ``image_ids[i]`` names image row ``i``."""

    image_ids: list[str]
    image_paths: list[Path]
    texts: list[str]
    embeddings: PairEmbeddings

    def caption_means(self) -> np.ndarray:
        """``(N, D)`` unit vectors: per image, the renormalised mean of its captions' vectors
        (one text vector per pair when an image has several captions)."""
        sums = np.zeros_like(self.embeddings.image)
        np.add.at(sums, self.embeddings.text_image, self.embeddings.text)
        return l2_normalise(sums)


def first_captions(pairs: PairSet, limit: int | None) -> PairSet:
    """``pairs`` with at most ``limit`` captions per image (the first ones; None: all).

    Encoding captions is most of the cost of embedding a captioned set on a CPU (Flickr8k has
    five per image), so a memory or a training run may keep fewer.
    """
    if limit is None:
        return pairs
    keep = first_caption_rows(pairs, limit)
    return PairSet(
        pairs.image_ids, pairs.images, [pairs.texts[i] for i in keep], pairs.text_image[keep]
    )


def first_caption_rows(pairs: PairSet, limit: int | None) -> np.ndarray:
    """``(T',)`` rows of the captions :func:`first_captions` keeps."""
    if limit is None:
        return np.arange(len(pairs.texts), dtype=np.int64)
    if limit < 1:
        raise InputError(f"max captions per image must be at least 1, got {limit}")
    seen = np.zeros(len(pairs.images), dtype=np.int64)
    keep = []
    for position, owner in enumerate(pairs.text_image.tolist()):
        if seen[owner] < limit:
            keep.append(position)
            seen[owner] += 1
    return np.asarray(keep, dtype=np.int64)


def embed_texts_cached(
    encoder: Encoder,
    texts: list[str],
    *,
    cache_dir: Path | None = None,
    show_progress: bool = False,
) -> np.ndarray:
    """Cached ``encoder.encode_texts(texts)``: ``(T, D)`` unit vectors."""
    digest = hashlib.sha256("\0".join(texts).encode())

    def compute() -> dict[str, np.ndarray]:
        return {"text": encoder.encode_texts(texts, show_progress=show_progress)}

    key = f"{encoder_fingerprint(encoder)}-texts-{digest.hexdigest()[:24]}"
    return cached_arrays(key, compute, cache_dir=cache_dir)["text"]


def embed_pair_set(
    encoder: Encoder,
    pairs: PairSet,
    *,
    cache_dir: Path | None = None,
    report: SkipReport | None = None,
    show_progress: bool = False,
) -> EmbeddedPairs:
    """Embed every image and caption of ``pairs``; images that fail to decode are dropped with
    their captions (and recorded in ``report`` the first time)."""
    image, ok = embed_images(
        encoder, pairs.images, cache_dir=cache_dir, report=report, show_progress=show_progress
    )
    text = embed_texts_cached(
        encoder, pairs.texts, cache_dir=cache_dir, show_progress=show_progress
    )
    keep_text = ok[pairs.text_image]
    kept_rows = np.flatnonzero(ok)
    embeddings = PairEmbeddings(
        image[ok], text[keep_text], (np.cumsum(ok) - 1)[pairs.text_image[keep_text]]
    )
    return EmbeddedPairs(
        [pairs.image_ids[i] for i in kept_rows],
        [pairs.images[i] for i in kept_rows],
        [t for t, keep in zip(pairs.texts, keep_text, strict=True) if keep],
        embeddings,
    )
