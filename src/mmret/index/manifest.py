"""The index folder's ``manifest.json``: format version, encoder and backend, written atomically."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mmret._files import write_atomic
from mmret._version import __version__
from mmret.errors import IndexFormatError

FORMAT = "mmret-index"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
ITEMS_FILE = "items.sqlite"


@dataclass(frozen=True)
class IndexManifest:
    """What an index folder holds and how to search it again without re-encoding."""

    encoder: str
    dim: int
    backend: str = "auto"
    backend_options: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    mmret_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexManifest:
        return cls(**data)


def write_manifest(folder: Path, manifest: IndexManifest) -> None:
    """Write via a temporary file and a rename, so a crash never leaves half a manifest."""
    write_atomic(folder / MANIFEST_FILE, (json.dumps(manifest.to_dict(), indent=2) + "\n").encode())


def read_manifest(folder: Path) -> IndexManifest:
    path = folder / MANIFEST_FILE
    if not folder.is_dir():
        raise IndexFormatError(f"{folder}: no such index folder")
    if not path.is_file():
        raise IndexFormatError(f"{folder}: not an mmret index (no {MANIFEST_FILE})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise IndexFormatError(f"{path}: corrupt manifest ({error})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise IndexFormatError(f"{path}: not an mmret index manifest")
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise IndexFormatError(
            f"{path}: format version {version!r} is newer than this mmret understands "
            f"({FORMAT_VERSION}); upgrade mmret"
        )
    try:
        return IndexManifest.from_dict(data)
    except TypeError as error:
        raise IndexFormatError(f"{path}: unexpected manifest fields ({error})") from None
