"""Layer features of a manifest's image-caption pairs, stored once on disk and read just in time.

A store is a folder under ``CACHE/layers/KEY``, keyed by what the features depend on (the
encoder's layer source, e.g. the frozen towers, and the exact images and captions, as the
training-feature cache is). It holds the pairs (``pairs.json``, ``text_image.npy``) and one
sub-folder per extracted layer, ``image-4/`` or ``text-2/``, each with:

* ``tokens.npy`` ``(sum of T, D)`` float16: every input's tokens, one after the other;
* ``offsets.npy`` ``(N + 1,)`` int64: input i's tokens are rows ``offsets[i]:offsets[i+1]``;
* ``pooled.npy`` ``(N, D)`` float16: the mean of each input's tokens, all a pooled head needs.

Token counts differ between texts, so tokens are stored ragged (no padding on disk) and padded
per batch when read. Everything is memory-mapped: reading a batch touches only its rows, so a
store of 100,000 items never needs to fit in memory. Layers asked for later are extracted into
the same store; layers already there are reused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image

from mmret._files import default_cache_dir, replace_folder
from mmret._progress import progress
from mmret.encoders.base import Encoder, batched
from mmret.encoders.fingerprint import spec_fingerprint
from mmret.encoders.towers import TOWERS
from mmret.errors import InputError
from mmret.ingest.images import decode_batch
from mmret.ingest.pairs import PairSet
from mmret.ingest.report import SkipReport
from mmret.layers import LayerFeatures, resolve_layers

IMAGE_BATCH = 32
TEXT_BATCH = 128
#: Texts are encoded a window at a time, shortest first, so a batch pads to similar lengths.
TEXT_WINDOW = 8 * TEXT_BATCH
PAIRS_FILE = "pairs.json"
T = TypeVar("T")


@dataclass(frozen=True)
class StoredLayer:
    """One layer of one tower on disk (memory-mapped; see the module docstring)."""

    tokens: np.ndarray
    offsets: np.ndarray
    pooled: np.ndarray

    @classmethod
    def open(cls, folder: Path) -> StoredLayer:
        return cls(
            np.load(folder / "tokens.npy", mmap_mode="r"),
            np.load(folder / "offsets.npy"),
            np.load(folder / "pooled.npy", mmap_mode="r"),
        )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def read(self, rows: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, T, D)`` float32 tokens of ``rows``, padded to the longest, and ``(B, T)`` mask."""
        rows = np.asarray(rows, dtype=np.int64)
        lengths = self.offsets[rows + 1] - self.offsets[rows]
        longest = int(lengths.max(initial=0))
        tokens = np.zeros((len(rows), longest, self.tokens.shape[1]), dtype=np.float32)
        mask = np.zeros((len(rows), longest), dtype=bool)
        for i, (row, length) in enumerate(zip(rows, lengths, strict=True)):
            start = self.offsets[row]
            tokens[i, :length] = self.tokens[start : start + length]
            mask[i, :length] = True
        return torch.from_numpy(tokens), torch.from_numpy(mask)

    def read_pooled(self, rows: Sequence[int] | np.ndarray) -> torch.Tensor:
        """``(B, D)`` float32 pooled features of ``rows``."""
        index = np.asarray(rows, dtype=np.int64)
        return torch.from_numpy(np.asarray(self.pooled[index], dtype=np.float32))


@dataclass(frozen=True)
class LayerFeatureSet:
    """The stored layers of a pair set: ``image[layer]`` per image, ``text[layer]`` per caption.

    ``image_ids`` are the images that decoded (failures are dropped with their captions) and
    ``text_image (T,)`` is each caption's index into them, as in :class:`PairFeatures`.
    """

    folder: Path
    image_ids: list[str]
    text_image: np.ndarray
    image: dict[int, StoredLayer]
    text: dict[int, StoredLayer]

    def require(self, image_layers: Sequence[int], text_layers: Sequence[int]) -> None:
        """Raise :class:`InputError` naming any of these layers that is not stored."""
        for name, stored, layers in (
            ("image", self.image, image_layers),
            ("text", self.text, text_layers),
        ):
            missing = [layer for layer in layers if layer not in stored]
            if missing:
                raise InputError(f"the feature store has no {name} layer(s) {missing}")

    def image_features(
        self, rows: Sequence[int] | np.ndarray, layers: Sequence[int]
    ) -> LayerFeatures:
        """Token features of images ``rows`` at ``layers`` (each must be stored)."""
        return _features(self.image, rows, layers)

    def text_features(
        self, rows: Sequence[int] | np.ndarray, layers: Sequence[int]
    ) -> LayerFeatures:
        """Token features of captions ``rows`` at ``layers`` (each must be stored)."""
        return _features(self.text, rows, layers)


def _features(
    stored: dict[int, StoredLayer], rows: Sequence[int] | np.ndarray, layers: Sequence[int]
) -> LayerFeatures:
    read = [stored[layer].read(rows) for layer in layers]
    return LayerFeatures(
        tuple(layers), tuple(tokens for tokens, _ in read), tuple(mask for _, mask in read)
    )


def default_store_dir() -> Path:
    """``~/.cache/mmret/layers`` (or ``$MMRET_CACHE/layers``)."""
    return default_cache_dir().parent / "layers"


def store_key(pairs: PairSet, encoder: Encoder) -> str:
    digest = hashlib.sha256(spec_fingerprint(encoder.layer_source).encode())
    digest.update(pairs.fingerprint(TOWERS).encode())
    return digest.hexdigest()[:24]


def layer_feature_set(
    pairs: PairSet,
    encoder: Encoder,
    image_layers: Sequence[int],
    text_layers: Sequence[int],
    *,
    cache_dir: Path | None = None,
    report: SkipReport | None = None,
    show_progress: bool = False,
) -> LayerFeatureSet:
    """Open the stored layer features of ``pairs``, extracting the layers not stored yet.

    The store lives in ``cache_dir`` (default :func:`default_store_dir`) under a key of the
    encoder's layer source and the pairs.
    """
    image_wanted = resolve_layers(image_layers, encoder.image_layer_count, "image")
    text_wanted = resolve_layers(text_layers, encoder.text_layer_count, "text")
    folder = (cache_dir or default_store_dir()) / store_key(pairs, encoder)
    folder.mkdir(parents=True, exist_ok=True)
    report = report or SkipReport()
    image_missing = [n for n in image_wanted if not (folder / f"image-{n}" / "done").is_file()]
    if image_missing or not (folder / PAIRS_FILE).is_file():
        ok = np.ones(len(pairs.images), dtype=bool)
        _write_layers(
            _decoded_images(pairs, encoder, ok, report),
            encoder.image_layer_features,
            image_missing or list(image_wanted),
            folder / "image",
            total=-(-len(pairs.images) // IMAGE_BATCH),
            show=show_progress,
        )
        _write_pairs(pairs, ok, folder)
    kept = json.loads((folder / PAIRS_FILE).read_text())
    text_missing = [n for n in text_wanted if not (folder / f"text-{n}" / "done").is_file()]
    if text_missing:
        texts = [pairs.texts[i] for i in np.load(folder / "text_rows.npy")]
        _write_layers(
            batched(texts, TEXT_WINDOW),
            lambda window, layers: _length_sorted(encoder, window, layers),
            text_missing,
            folder / "text",
            total=-(-len(texts) // TEXT_WINDOW),
            show=show_progress,
        )
    return LayerFeatureSet(
        folder,
        kept["image_ids"],
        np.load(folder / "text_image.npy"),
        {n: StoredLayer.open(folder / f"image-{n}") for n in image_wanted},
        {n: StoredLayer.open(folder / f"text-{n}") for n in text_wanted},
    )


class _RaggedWriter:
    """Streams ``(T, D)`` token blocks and pooled rows to disk; the ``.npy`` headers are written
    at the end, when the totals are known, so nothing is held in memory."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.tokens = (folder / "tokens.bin").open("wb")
        self.pooled = (folder / "pooled.bin").open("wb")
        self.offsets = [0]
        self.width = 0

    def add(self, tokens: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor) -> None:
        """``(B, T, D)`` tokens, their ``(B, T)`` mask and ``(B, D)`` pooled features."""
        self.width = tokens.shape[-1]
        # Boolean indexing keeps row-major order: each input's real tokens, one input after
        # the other, which is exactly the ragged layout.
        self.tokens.write(tokens.to(torch.float16)[mask].numpy().tobytes())
        for length in mask.sum(dim=1).tolist():
            self.offsets.append(self.offsets[-1] + length)
        self.pooled.write(pooled.to(torch.float16).contiguous().numpy().tobytes())

    def finish(self) -> None:
        self.tokens.close()
        self.pooled.close()
        _to_npy(self.folder / "tokens.bin", (self.offsets[-1], self.width))
        _to_npy(self.folder / "pooled.bin", (len(self.offsets) - 1, self.width))
        np.save(self.folder / "offsets.npy", np.asarray(self.offsets, dtype=np.int64))
        (self.folder / "done").write_text("")


def _to_npy(raw: Path, shape: tuple[int, int]) -> None:
    """Turn a file of raw float16 rows into ``.npy`` of ``shape`` (header first, then data)."""
    with raw.with_suffix(".npy").open("wb") as out:
        header = {"descr": np.dtype(np.float16).str, "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(out, header)
        with raw.open("rb") as data:
            while chunk := data.read(1 << 24):
                out.write(chunk)
    raw.unlink()


def _decoded_images(
    pairs: PairSet, encoder: Encoder, ok: np.ndarray, report: SkipReport
) -> Iterator[list[Image.Image]]:
    """Batches of decoded images; ``ok[i]`` is set False for an image that fails to decode."""
    for start in range(0, len(pairs.images), IMAGE_BATCH):
        batch = pairs.images[start : start + IMAGE_BATCH]
        decoded, positions = decode_batch(batch, report, draft_size=2 * encoder.image_size)
        ok[start : start + len(batch)] = False
        ok[[start + p for p in positions]] = True
        yield decoded


def _length_sorted(encoder: Encoder, texts: Sequence[str], layers: Sequence[int]) -> LayerFeatures:
    """:meth:`Encoder.text_layer_features` of ``texts`` in batches of similar length (a batch
    pads to its longest text, and captions vary from 5 to 40 tokens), returned in input order.
    """
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    parts = [
        (rows, encoder.text_layer_features([texts[i] for i in rows], layers))
        for rows in batched(order, TEXT_BATCH)
    ]
    longest = max(part.masks[0].shape[1] for _, part in parts)
    tokens, masks = [], []
    for level in range(len(layers)):
        width = parts[0][1].tokens[level].shape[2]
        level_tokens = torch.zeros(len(texts), longest, width)
        level_mask = torch.zeros(len(texts), longest, dtype=torch.bool)
        for rows, part in parts:
            length = part.masks[level].shape[1]
            level_tokens[list(rows), :length] = part.tokens[level]
            level_mask[list(rows), :length] = part.masks[level]
        tokens.append(level_tokens)
        masks.append(level_mask)
    return LayerFeatures(tuple(layers), tuple(tokens), tuple(masks))


def _write_layers(
    batches: Iterable[Sequence[T]],
    compute: Callable[[Sequence[T], Sequence[int]], LayerFeatures],
    layers: Sequence[int],
    prefix: Path,
    *,
    total: int,
    show: bool,
) -> None:
    """Run ``compute`` on every batch and store each layer in ``{prefix}-{layer}/``."""
    folders = {n: prefix.with_name(f"{prefix.name}-{n}") for n in layers}
    with ExitStack() as stack:
        writers = {
            n: _RaggedWriter(stack.enter_context(replace_folder(f))) for n, f in folders.items()
        }
        label = f"{prefix.name.capitalize()} layers {', '.join(map(str, layers))}"
        for batch in progress(batches, total=total, description=label, enabled=show):
            if not batch:
                continue
            features = compute(batch, layers)
            pooled = features.pooled()
            for i, n in enumerate(layers):
                writers[n].add(features.tokens[i], features.masks[i], pooled[i])
        for writer in writers.values():
            writer.finish()


def _write_pairs(pairs: PairSet, ok: np.ndarray, folder: Path) -> None:
    """The images that decoded and their captions; a later extraction must agree with them."""
    kept_ids = [i for i, keep in zip(pairs.image_ids, ok, strict=True) if keep]
    path = folder / PAIRS_FILE
    if path.is_file():
        if json.loads(path.read_text())["image_ids"] != kept_ids:
            raise InputError(
                f"{folder}: images decoded differently from when this store was made; "
                "delete the folder to rebuild it"
            )
        return
    text_rows = np.flatnonzero(ok[pairs.text_image])
    new_index = np.cumsum(ok) - 1
    np.save(folder / "text_rows.npy", text_rows)
    np.save(folder / "text_image.npy", new_index[pairs.text_image[text_rows]])
    path.write_text(json.dumps({"image_ids": kept_ids}))
