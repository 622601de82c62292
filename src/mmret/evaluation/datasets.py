"""Image-caption test sets in the formats people already have, read as a :class:`PairSet`.

* an mmret manifest (``.jsonl``, ``.csv``, ``.parquet``): every entry with an image and captions;
* a Karpathy split file (``dataset_flickr30k.json``, ``dataset_coco.json``, ...):
  ``{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}]}]}``, one split of it;
  image paths are ``IMAGES/filepath/filename``;
* a COCO captions file (``captions_val2014.json``): ``{"images": [{"id", "file_name"}],
  "annotations": [{"image_id", "caption"}]}``, images in ``IMAGES/file_name``.

Entries whose image file is missing are skipped and recorded in the :class:`SkipReport`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from mmret.errors import InputError
from mmret.ingest.pairs import PairSet, read_pairs
from mmret.ingest.report import SkipReport
from mmret.ingest.sources import MANIFEST_SUFFIXES

KARPATHY_SPLITS = ("train", "restval", "val", "test")


def load_pairs(
    path: Path,
    *,
    split: str | None = None,
    images: Path | None = None,
    report: SkipReport | None = None,
) -> PairSet:
    """Read a test set from a manifest, a Karpathy split file or a COCO captions file.

    ``split`` (Karpathy files only) defaults to ``"test"``; ``images`` is the image folder
    (Karpathy: default the file's folder; COCO captions: required).
    """
    report = report if report is not None else SkipReport()
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.suffix.lower() in MANIFEST_SUFFIXES:
        if split is not None or images is not None:
            raise InputError("--split and --images apply to Karpathy and COCO .json files only")
        return read_pairs(path, report)
    if path.suffix.lower() != ".json":
        known = ", ".join(sorted({*MANIFEST_SUFFIXES, ".json"}))
        raise InputError(f"{path}: unknown test-set format (expected one of {known})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: not valid JSON ({error})") from None
    if isinstance(data, dict) and "annotations" in data and "images" in data:
        if split is not None:
            raise InputError("--split applies to Karpathy split files, not COCO captions files")
        if images is None:
            raise InputError(f"{path} is a COCO captions file: give its image folder with --images")
        entries = _coco_entries(data, images)
    elif isinstance(data, dict) and isinstance(data.get("images"), list):
        entries = _karpathy_entries(data, images or path.parent, split or "test")
    else:
        raise InputError(f"{path}: neither a Karpathy split file nor a COCO captions file")
    return _pair_set(entries, report, path)


def _karpathy_entries(
    data: dict[str, Any], images: Path, split: str
) -> Iterable[tuple[str, Path, list[str]]]:
    if split not in KARPATHY_SPLITS:
        raise InputError(f"unknown split {split!r} (expected one of {', '.join(KARPATHY_SPLITS)})")
    for number, entry in enumerate(data["images"]):
        if not isinstance(entry, dict) or "filename" not in entry:
            raise InputError(f"Karpathy entry {number} has no 'filename'")
        if entry.get("split") != split:
            continue
        folder = images / entry["filepath"] if entry.get("filepath") else images
        captions = [str(s.get("raw", "")) for s in entry.get("sentences", [])]
        name = str(entry.get("cocoid", entry.get("imgid", entry["filename"])))
        yield name, folder / entry["filename"], captions


def _coco_entries(data: dict[str, Any], images: Path) -> Iterable[tuple[str, Path, list[str]]]:
    captions: dict[Any, list[str]] = {}
    for note in data["annotations"]:
        captions.setdefault(note["image_id"], []).append(str(note["caption"]))
    for entry in data["images"]:
        yield str(entry["id"]), images / entry["file_name"], captions.get(entry["id"], [])


def _pair_set(
    entries: Iterable[tuple[str, Path, list[str]]], report: SkipReport, source: Path
) -> PairSet:
    ids: list[str] = []
    paths: list[Path] = []
    texts: list[str] = []
    owners: list[int] = []
    for name, image, captions in entries:
        kept = [c.strip() for c in captions if c.strip()]
        if not kept:
            report.skip(f"{name}: no caption")
            continue
        if not image.is_file():
            report.skip(f"{name}: image file not found: {image}")
            continue
        texts.extend(kept)
        owners.extend([len(paths)] * len(kept))
        ids.append(name)
        paths.append(image.resolve())
    if not paths:
        raise InputError(f"{source}: no entry of this split has both an image and a caption")
    return PairSet(ids, paths, texts, np.asarray(owners, dtype=np.int64))
