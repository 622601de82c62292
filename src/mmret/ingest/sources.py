"""Item sources: a folder of images, or a JSONL, CSV or Parquet manifest.

Manifest rows look like ``{"id": str, "image": path, "text": str}`` or carry ``"captions":
[str, ...]`` instead of ``"text"``; every other key is metadata. Image paths are relative to the
manifest. A folder source walks images recursively; an optional sibling ``name.txt`` is the
caption and the item id is the path relative to the folder, without extension.

Bad rows are skipped and recorded in a :class:`SkipReport`; they never stop the run. A row is
kept only if everything it holds can be stored (:class:`Item`'s checks), so nothing that
passes here fails later, when the item is encoded or stored.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmret.errors import InputError
from mmret.ingest.report import SkipReport
from mmret.items import Item

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
MANIFEST_SUFFIXES = frozenset({".jsonl", ".csv", ".parquet"})
_RESERVED = frozenset({"id", "image", "text", "captions"})


@dataclass(frozen=True)
class Record:
    """One validated source entry; ``captions`` holds every text it has (maybe none)."""

    id: str
    image: Path | None
    captions: tuple[str, ...]
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def to_item(self) -> Item:
        """The indexable item: several captions are joined into one text, one per line."""
        text = "\n".join(self.captions) if self.captions else None
        image = str(self.image) if self.image is not None else None
        return Item(id=self.id, text=text, image=image, metadata=dict(self.metadata))


class ItemSource:
    """The items of a folder or manifest, read lazily, with what the reading skipped.

    Each pass over it reads the source afresh, and :attr:`skipped` holds that pass's skips.
    :meth:`Retriever.add <mmret.Retriever.add>` reads it through :meth:`read` into its own
    report, so ``retriever.add(read_items("photos/"))`` reports the source's skips with its own.
    The path is taken relative to the working directory at the time the source is made.
    """

    def __init__(self, source: str | Path) -> None:
        self.path = Path(source).absolute()
        _check_source(self.path)
        self.skipped = SkipReport()

    def __iter__(self) -> Iterator[Item]:
        self.skipped = SkipReport()
        return self.read(self.skipped)

    def read(self, report: SkipReport) -> Iterator[Item]:
        """The items in source order; every skipped entry is recorded in ``report``."""
        for record in read_records(self.path, report):
            yield record.to_item()

    def __repr__(self) -> str:
        return f"ItemSource({str(self.path)!r})"


def read_items(source: str | Path) -> ItemSource:
    """Items from a folder or manifest (see :class:`ItemSource`); fails at once if ``source``
    is missing or of an unknown kind."""
    return ItemSource(source)


def _check_source(path: Path) -> None:
    if path.is_dir():
        return
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.suffix.lower() not in MANIFEST_SUFFIXES:
        known = ", ".join(sorted(MANIFEST_SUFFIXES))
        raise InputError(f"{path}: not a folder or a manifest (expected one of {known})")


def read_records(source: str | Path, report: SkipReport | None = None) -> Iterator[Record]:
    """Validated records from a folder or manifest; duplicates of an earlier id are skipped.

    Image paths are relative to the folder or to the manifest's folder, wherever the process
    runs; records hold them absolute.
    """
    path = Path(source).absolute()
    report = report if report is not None else SkipReport()
    _check_source(path)
    if path.is_dir():
        rows: Iterable[tuple[str, Any]] = _folder_rows(path, report)
        base = path
    else:
        rows = {".jsonl": _jsonl_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}[
            path.suffix.lower()
        ](path)
        base = path.parent
    seen: set[str] = set()
    for where, row in rows:
        try:
            if isinstance(row, InputError):
                raise row
            record = _validate(row, base)
        except InputError as error:
            report.skip(f"{where}: {error}")
            continue
        if record.id in seen:
            report.skip(f"{where}: duplicate id {record.id!r}")
            continue
        seen.add(record.id)
        yield record


def _validate(row: Any, base: Path) -> Record:
    if not isinstance(row, Mapping):
        raise InputError(f"expected an object, got {type(row).__name__}")
    raw_id = row.get("id")
    if isinstance(raw_id, bool) or not isinstance(raw_id, str | int) or raw_id == "":
        raise InputError(f"missing or invalid 'id' ({raw_id!r})")
    image = row.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise InputError(f"'image' must be a path string, got {image!r}")
    captions = _captions(row)
    if image is None and not captions:
        raise InputError("has neither an image nor a text")
    image_path = None if image is None else _image_file(base, image)
    metadata = {key: value for key, value in row.items() if key not in _RESERVED}
    record = Record(str(raw_id), image_path, captions, metadata)
    record.to_item()  # the checks an Item makes (valid Unicode, storable metadata), now
    return record


def _image_file(base: Path, image: str) -> Path:
    """``image`` (absolute, or relative to ``base``) as an absolute path to an existing file."""
    try:
        path = Path(image) if Path(image).is_absolute() else (base / image).resolve()
        found = path.is_file()
    except (OSError, ValueError) as error:  # a NUL byte, a name too long, unencodable text
        raise InputError(f"image path {image!r} cannot be used ({error})") from None
    if not found:
        raise InputError(f"image file not found: {path}")
    return path


def _captions(row: Mapping[str, Any]) -> tuple[str, ...]:
    texts: list[str] = []
    text = row.get("text")
    if text is not None:
        if not isinstance(text, str):
            raise InputError(f"'text' must be a string, got {type(text).__name__}")
        texts.append(text)
    captions = row.get("captions")
    if captions is not None:
        if not isinstance(captions, list | tuple) or not all(isinstance(c, str) for c in captions):
            raise InputError("'captions' must be a list of strings")
        texts.extend(captions)
    return tuple(t for t in (t.strip() for t in texts) if t)


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path.name}:{number}"
            if not raw.strip():
                continue
            try:
                yield where, json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as error:
                yield where, InputError(f"not valid UTF-8 (byte {error.start})")
            except json.JSONDecodeError as error:
                yield where, InputError(f"invalid JSON ({error.msg} at column {error.colno})")
            except ValueError as error:  # an integer of over 4,300 digits; drop Python's advice
                yield where, InputError(f"invalid JSON ({str(error).split(';')[0]})")
            except RecursionError:
                yield where, InputError("nested too deeply to be read")


def _csv_rows(path: Path) -> Iterator[tuple[str, Any]]:
    # surrogateescape: a bad byte turns into a lone surrogate in its row alone, which is then
    # skipped, where a strict decoder would stop the whole file there.
    with path.open(newline="", encoding="utf-8", errors="surrogateescape") as handle:
        reader = csv.DictReader(handle)
        while True:
            line = reader.line_num
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as error:  # a field over the size limit, a stray quote, ...
                # The reader has consumed the bad record's lines and goes on after them.
                yield f"{path.name}:{line + 1}", InputError(f"not valid CSV ({error})")
                continue
            where = f"{path.name}:{reader.line_num}"
            if any(_undecodable(cell) for cell in [*row.keys(), *row.values()]):
                yield where, InputError("not valid UTF-8")
            else:
                yield where, _typed_csv_row(row)


def _undecodable(cell: object) -> bool:
    """Whether a CSV cell read with ``surrogateescape`` held bytes that are not UTF-8."""
    if isinstance(cell, list):  # DictReader's list of extra cells beyond the header
        return any(_undecodable(c) for c in cell)
    return isinstance(cell, str) and any("\udc80" <= char <= "\udcff" for char in cell)


def _typed_csv_row(row: dict[str | None, Any]) -> dict[str, Any]:
    """CSV cells are strings: empty cells vanish, numbers become numbers, captions a JSON list."""
    typed: dict[str, Any] = {}
    for key, value in row.items():
        if key is None or value is None or value == "":
            continue
        if key == "captions" and value.lstrip().startswith("["):
            try:
                typed[key] = json.loads(value)
            except json.JSONDecodeError:
                typed[key] = value
        elif key in _RESERVED:
            typed[key] = value
        else:
            typed[key] = _number_or_text(value)
    return typed


def _number_or_text(value: str) -> Any:
    for kind in (int, float):
        try:
            number = kind(value)
        except ValueError:
            continue
        return number if not (isinstance(number, float) and not math.isfinite(number)) else value
    return value


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises several unrelated types for a bad file
        raise InputError(f"{path}: cannot be read as Parquet ({error})") from None
    number = 0
    try:
        for batch in table.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                number += 1
                yield f"{path.name}:row {number}", {k: v for k, v in row.items() if v is not None}
    except Exception as error:  # a damaged row group: keep the rows read, report the rest
        yield (
            f"{path.name}:row {number + 1}",
            InputError(f"this row and any after it cannot be read ({error})"),
        )


def _folder_rows(folder: Path, report: SkipReport) -> Iterator[tuple[str, Any]]:
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        if not path.is_file():
            continue
        relative = path.relative_to(folder)
        # Like a manifest's, the image path is relative to the source: validation joins it on.
        row: dict[str, Any] = {"id": relative.with_suffix("").as_posix(), "image": str(relative)}
        if len(relative.parts) > 1:
            row["folder"] = relative.parent.as_posix()
        caption = path.with_suffix(".txt")
        if caption.is_file():
            try:
                row["text"] = caption.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError) as error:
                report.skip(f"{caption}: caption unreadable ({error}); image indexed without it")
        yield str(relative), row
