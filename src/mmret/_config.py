"""Configs are frozen dataclasses that read and write themselves as JSON objects."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, Self


class JsonConfig:
    """``to_dict`` / ``from_dict`` for a frozen dataclass: fields typed ``tuple[...]``, which
    JSON holds as lists, come back as tuples (configs compare and hash as written)."""

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = asdict(self)  # type: ignore[call-overload]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        values = dict(data)
        for spec in fields(cls):  # type: ignore[arg-type]
            if str(spec.type).startswith("tuple") and isinstance(values.get(spec.name), list):
                values[spec.name] = tuple(values[spec.name])
        return cls(**values)
