"""Embedding evaluation data with any encoder, cached on disk for later runs.

A cache entry is a folder of ``.npy`` arrays under ``CACHE/embeddings/KEY`` (``CACHE`` is
``~/.cache/mmret`` or ``$MMRET_CACHE`` unless given), keyed by the encoder (its spec and the
hash of any weight files it names) and by the exact inputs (image paths with their size and
modification time, texts), so a retrained head or an edited image is never served stale.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmret._files import default_cache_dir, hash_file_stats, replace_folder
from mmret._progress import progress
from mmret.encoders.base import Content, Encoder, batched
from mmret.encoders.fingerprint import encoder_fingerprint
from mmret.encoders.towers import TOWERS
from mmret.ingest.images import decode_batch
from mmret.ingest.pairs import PairSet
from mmret.ingest.report import SkipReport
from mmret.items import Item


@dataclass(frozen=True)
class PairEmbeddings:
    """Unit-norm ``image (N, D)`` and ``text (T, D)``; ``text_image[t]`` is caption t's image."""

    image: np.ndarray
    text: np.ndarray
    text_image: np.ndarray


def files_fingerprint(paths: Sequence[Path]) -> str:
    """A hash of each file's path, size and modification time, in order."""
    digest = hashlib.sha256()
    hash_file_stats(digest, paths)
    return digest.hexdigest()[:24]


def cached_arrays(
    key: str,
    compute: Callable[[], dict[str, np.ndarray]],
    *,
    cache_dir: Path | None = None,
) -> dict[str, np.ndarray]:
    """The arrays cached under ``key``, or ``compute()``'s, saved there for next time."""
    root = cache_dir if cache_dir is not None else default_cache_dir().parent
    folder = root / "embeddings" / key
    done = folder / "done.json"
    if done.is_file():
        # entries written before the list of arrays was recorded hold just the .npy files
        names = json.loads(done.read_text()).get("arrays") or [
            file.stem for file in folder.glob("*.npy")
        ]
        return {name: np.load(folder / f"{name}.npy") for name in names}
    arrays = compute()
    with replace_folder(folder) as scratch:
        for name, array in arrays.items():
            np.save(scratch / f"{name}.npy", array)
        (scratch / "done.json").write_text(json.dumps({"arrays": list(arrays)}))
    return arrays


def encode_image_files(
    encoder: Encoder, paths: Sequence[Path], report: SkipReport, *, show_progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """``(N, D)`` unit vectors of image files and an ``(N,)`` mask of those that decoded.

    Rows of images that fail to decode are zero and recorded in ``report``.
    """
    image = np.zeros((len(paths), encoder.dim), dtype=np.float32)
    ok = np.zeros(len(paths), dtype=bool)
    start = 0
    total = -(-len(paths) // encoder.batch_size)
    batches = batched(paths, encoder.batch_size)
    for batch in progress(
        batches, total=total, description="Encoding images", enabled=show_progress
    ):
        decoded, positions = decode_batch(batch, report, draft_size=2 * encoder.image_size)
        if decoded:
            rows = [start + p for p in positions]
            image[rows] = encoder.normalise(encoder.encode_images(decoded))
            ok[rows] = True
        start += len(batch)
    return image, ok


def embed_pairs(
    encoder: Encoder,
    pairs: PairSet,
    *,
    cache_dir: Path | None = None,
    report: SkipReport | None = None,
    show_progress: bool = False,
) -> PairEmbeddings:
    """Embed every image and caption; images that fail to decode are dropped with their captions."""
    report = report if report is not None else SkipReport()

    def compute() -> dict[str, np.ndarray]:
        image, ok = encode_image_files(encoder, pairs.images, report, show_progress=show_progress)
        text = encoder.encode_texts(pairs.texts, show_progress=show_progress)
        keep_text = ok[pairs.text_image]
        return {
            "image": image[ok],
            "text": text[keep_text],
            "text_image": (np.cumsum(ok) - 1)[pairs.text_image[keep_text]],
        }

    key = f"{encoder_fingerprint(encoder)}-{pairs.fingerprint(TOWERS)}"
    arrays = cached_arrays(key, compute, cache_dir=cache_dir)
    return PairEmbeddings(arrays["image"], arrays["text"], arrays["text_image"])


def embed_images(
    encoder: Encoder,
    paths: Sequence[Path],
    *,
    cache_dir: Path | None = None,
    report: SkipReport | None = None,
    show_progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Cached :func:`encode_image_files`: ``(N, D)`` unit vectors and the ``(N,)`` decoded mask.

    A cached run does not record decoding failures in ``report`` again; the mask still has them.
    """
    report = report if report is not None else SkipReport()

    def compute() -> dict[str, np.ndarray]:
        image, ok = encode_image_files(encoder, paths, report, show_progress=show_progress)
        return {"image": image, "ok": ok}

    key = f"{encoder_fingerprint(encoder)}-images-{files_fingerprint(paths)}"
    arrays = cached_arrays(key, compute, cache_dir=cache_dir)
    return arrays["image"], arrays["ok"]


def embed_items(
    encoder: Encoder,
    items: Sequence[Item],
    *,
    cache_dir: Path | None = None,
    show_progress: bool = False,
) -> np.ndarray:
    """Cached ``encoder.encode(items)``: ``(N, D)`` unit vectors of texts, images or both."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(f"{item.id}\0{item.text}\0".encode())
        if isinstance(item.image, str | Path):
            digest.update(files_fingerprint([Path(item.image)]).encode())
        elif isinstance(item.image, bytes):
            digest.update(hashlib.sha256(item.image).digest())
        digest.update(b"\n")

    def compute() -> dict[str, np.ndarray]:
        contents: Sequence[Content] = items
        return {"vectors": encoder.encode(contents, show_progress=show_progress)}

    key = f"{encoder_fingerprint(encoder)}-items-{digest.hexdigest()[:24]}"
    return cached_arrays(key, compute, cache_dir=cache_dir)["vectors"]
