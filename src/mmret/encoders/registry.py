"""Encoder backends by scheme: ``"starter"``, ``"hf:NAME"``, ``"open_clip:MODEL/PRETRAINED"``."""

from __future__ import annotations

from collections.abc import Callable

from mmret.encoders.base import Encoder
from mmret.registry import Registry

#: scheme -> factory taking the part after ``scheme:`` ("" when absent).
ENCODERS: Registry[Callable[[str], Encoder]] = Registry("encoder")


def load_encoder(spec: str) -> Encoder:
    """Build the encoder a spec names (see :mod:`mmret.encoders`, whose import registers
    every backend)."""
    scheme, _, rest = spec.partition(":")
    return ENCODERS.get(scheme)(rest)
