"""Collecting what was skipped during ingestion, so one bad entry never stops a run."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_REASONS = 20


@dataclass
class SkipReport:
    """Counts skipped entries and keeps the first :data:`MAX_REASONS` reasons verbatim."""

    skipped: int = 0
    reasons: list[str] = field(default_factory=list)

    def skip(self, reason: str) -> None:
        self.skipped += 1
        if len(self.reasons) < MAX_REASONS:
            # A reason quotes the input, which may hold lone surrogates (a file name that is
            # not UTF-8): escape them, so that printing the report cannot fail.
            self.reasons.append(reason.encode("utf-8", "backslashreplace").decode("utf-8"))

    def merge(self, other: SkipReport) -> None:
        for reason in other.reasons:
            if len(self.reasons) < MAX_REASONS:
                self.reasons.append(reason)
        self.skipped += other.skipped

    def summary(self) -> str:
        if not self.skipped:
            return "nothing skipped"
        more = self.skipped - len(self.reasons)
        lines = [f"skipped {self.skipped} entr{'y' if self.skipped == 1 else 'ies'}:"]
        lines += [f"  - {reason}" for reason in self.reasons]
        if more:
            lines.append(f"  ... and {more} more")
        return "\n".join(lines)
