"""Fingerprints of encoders: what caches of their embeddings are keyed by."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from mmret.encoders.starter import WEIGHTS

if TYPE_CHECKING:
    from mmret.encoders.base import Encoder


def encoder_fingerprint(encoder: Encoder) -> str:
    """The spec, plus a hash of any weight files it names (a retrained head changes the key),
    plus the encoder's variant (a query side embeds differently from its document side)."""
    fingerprint = spec_fingerprint(encoder.spec)
    return f"{fingerprint}-{encoder.variant}" if encoder.variant else fingerprint


def spec_fingerprint(spec: str) -> str:
    """``spec`` plus a hash of the weight files in the folder it names, or of the weights
    shipped under its name for a bare spec (``hat``), so retrained weights change the key."""
    digest = hashlib.sha256(spec.encode())
    _, _, location = spec.partition(":")
    path = Path(location) if location else WEIGHTS / spec
    if path.is_dir():
        for file in sorted(path.glob("*.safetensors")):
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]
