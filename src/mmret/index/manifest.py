"""The index folder's ``manifest.json``: format version, encoder and backend, written atomically."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mmret._files import write_atomic
from mmret._version import __version__
from mmret.errors import IndexFormatError

FORMAT = "mmret-index"
#: 2: vectors in a table of their own, removal log, checksums (1 was never released).
FORMAT_VERSION = 2
MANIFEST_FILE = "manifest.json"
ITEMS_FILE = "items.sqlite"


@dataclass(frozen=True)
class IndexManifest:
    """What an index folder holds and how to search it again without re-encoding."""

    encoder: str
    dim: int
    backend: str = "auto"
    backend_options: dict[str, Any] = field(default_factory=dict)
    #: The RECO memory and fusion the stored vectors were refined with (None: not refined).
    refiner: dict[str, Any] | None = None
    #: The size of each token for a multi-vector (late-interaction) encoder, whose ``dim`` is
    #: then ``T * token_dim``; ``None`` for one vector per item (and in manifests written
    #: before multi-vector models existed).
    token_dim: int | None = None
    #: The token features stored beside the items for reranking (a
    #: :class:`~mmret.reranker.TokenFeatureSpec`; None: none stored).
    token_features: dict[str, Any] | None = None
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    mmret_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.token_dim is None:
            # Left out rather than null: a single-vector index's manifest stays byte for byte
            # what older versions wrote (and its copy in the database keeps matching).
            del data["token_dim"]
        if data["token_features"] is None:  # as manifests written before the field read
            del data["token_features"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexManifest:
        return cls(**data)


def _checksum(fields: dict[str, Any]) -> str:
    """Of the manifest's fields, the checksum itself not among them."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def manifest_text(manifest: IndexManifest) -> str:
    """The manifest's JSON with a checksum of its fields, which reading verifies."""
    data = manifest.to_dict()
    return json.dumps({**data, "checksum": _checksum(data)}, indent=2) + "\n"


def write_manifest(folder: Path, manifest: IndexManifest) -> None:
    """Write via a temporary file and a rename, so a crash never leaves half a manifest."""
    write_atomic(folder / MANIFEST_FILE, manifest_text(manifest).encode())


def read_manifest(folder: Path) -> IndexManifest:
    path = folder / MANIFEST_FILE
    if not folder.is_dir():
        raise IndexFormatError(f"{folder}: no such index folder")
    if not path.is_file():
        raise IndexFormatError(f"{folder}: not an mmret index (no {MANIFEST_FILE})")
    try:
        return parse_manifest(path.read_bytes(), path)
    except OSError as error:
        raise IndexFormatError(f"{path}: cannot be read ({error})") from None


def parse_manifest(raw: bytes, path: Path) -> IndexManifest:
    """Validate manifest JSON (from ``path``, named in errors)."""
    try:
        data = json.loads(raw.decode("utf-8"))
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
    if version < FORMAT_VERSION:
        raise IndexFormatError(
            f"{path}: format version {version} comes from a development version of mmret "
            f"that this one ({FORMAT_VERSION}) does not read; index the collection again"
        )
    recorded = data.pop("checksum", None)
    if recorded != _checksum(data):
        raise IndexFormatError(
            f"{path}: checksum mismatch (the file was altered or damaged; `mmret repair` "
            "restores it from the copy kept in the item database)"
        )
    try:
        return IndexManifest.from_dict(data)
    except TypeError as error:
        raise IndexFormatError(f"{path}: unexpected manifest fields ({error})") from None
