"""Embedding a manifest's images and captions with any encoder, cached for later runs."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmret._files import replace_folder
from mmret._progress import progress
from mmret.encoders.base import Encoder, batched, l2_normalise
from mmret.ingest.images import decode_batch
from mmret.ingest.report import SkipReport
from mmret.training.features import PairSet, default_cache_dir


@dataclass(frozen=True)
class PairEmbeddings:
    """Unit-norm ``image (N, D)`` and ``text (T, D)``; ``text_image[t]`` is caption t's image."""

    image: np.ndarray
    text: np.ndarray
    text_image: np.ndarray


def encoder_fingerprint(encoder: Encoder) -> str:
    """The spec, plus a hash of any weight files it names (a retrained head changes the key)."""
    digest = hashlib.sha256(encoder.spec.encode())
    _, _, location = encoder.spec.partition(":")
    path = Path(location)
    if location and path.is_dir():
        for file in sorted(path.glob("*.safetensors")):
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def embed_pairs(
    encoder: Encoder,
    pairs: PairSet,
    *,
    cache_dir: Path | None = None,
    report: SkipReport | None = None,
    show_progress: bool = False,
) -> PairEmbeddings:
    """Embed every image and caption; images that fail to decode are dropped with their captions."""
    key = f"{encoder_fingerprint(encoder)}-{pairs.fingerprint()}"
    folder = (cache_dir or default_cache_dir()).parent / "embeddings" / key
    if (folder / "done.json").is_file():
        return PairEmbeddings(
            *(np.load(folder / f"{name}.npy") for name in ("image", "text", "text_image"))
        )
    report = report if report is not None else SkipReport()
    image = np.zeros((len(pairs.images), encoder.dim), dtype=np.float32)
    ok = np.zeros(len(pairs.images), dtype=bool)
    start = 0
    batches = batched(pairs.images, encoder.batch_size)
    total = -(-len(pairs.images) // encoder.batch_size)
    for batch in progress(
        batches, total=total, description="Encoding images", enabled=show_progress
    ):
        decoded, positions = decode_batch(batch, report, draft_size=2 * encoder.image_size)
        if decoded:
            rows = [start + p for p in positions]
            image[rows] = l2_normalise(encoder.encode_images(decoded))
            ok[rows] = True
        start += len(batch)
    text = encoder.encode_texts(pairs.texts, show_progress=show_progress)
    keep_text = ok[pairs.text_image]
    result = PairEmbeddings(
        image[ok], text[keep_text], (np.cumsum(ok) - 1)[pairs.text_image[keep_text]]
    )
    with replace_folder(folder) as scratch:
        for name in ("image", "text", "text_image"):
            np.save(scratch / f"{name}.npy", getattr(result, name))
        (scratch / "done.json").write_text(json.dumps({"encoder": encoder.spec}))
    return result
