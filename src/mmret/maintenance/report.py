"""What a check of an index folder found."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class CheckReport:
    """What ``check_index`` found: ``problems`` are damage, ``notices`` are harmless."""

    folder: str
    items: int = 0
    problems: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    #: Which parts are damaged: ``"manifest"``, ``"items"``, ``"cache"`` and/or ``"tokens"``.
    damaged: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, part: str, message: str) -> None:
        self.damaged.add(part)
        self.problems.append(message)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "damaged": sorted(self.damaged), "ok": self.ok}
