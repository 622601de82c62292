"""Rendering evaluation results: terminal tables, Markdown, JSON and PNG plots.

Every ``mmret eval`` command builds :class:`MetricTable` objects and hands them, with its JSON
record and plot data, to the functions here, so the three commands report alike. Plots use
matplotlib's object API on the Agg canvas: no pyplot, no global backend, no display needed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from mmret.errors import InputError


@dataclass(frozen=True)
class MetricTable:
    """A titled table of already formatted cells; the first column labels the rows."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    notes: tuple[str, ...] = ()

    def to_rich(self) -> Table:
        table = Table(title=self.title, title_justify="left")
        for number, column in enumerate(self.columns):
            table.add_column(column, justify="right" if self._numeric(number) else "left")
        for row in self.rows:
            table.add_row(*row)
        return table

    def to_markdown(self) -> str:
        """A GitHub-flavoured Markdown table under a ``###`` heading, notes below it."""
        escape = str.maketrans({"|": "\\|"})
        lines = [f"### {self.title}", ""]
        lines.append("| " + " | ".join(c.translate(escape) for c in self.columns) + " |")
        rules = ("---:" if self._numeric(n) else "---" for n in range(len(self.columns)))
        lines.append("|" + "|".join(rules) + "|")
        lines += ["| " + " | ".join(c.translate(escape) for c in row) + " |" for row in self.rows]
        for note in self.notes:
            lines += ["", note]
        return "\n".join(lines) + "\n"

    def _numeric(self, column: int) -> bool:
        """Whether every cell of a column (other than the first) is a number or ``-``."""
        if column == 0 or not self.rows:
            return False
        for row in self.rows:
            try:
                float(row[column].rstrip("%"))
            except ValueError:
                if row[column] != "-":
                    return False
        return True


def percent(value: float) -> str:
    """``"52.6"`` for a percentage, ``"-"`` for NaN.

    >>> percent(52.62), percent(float("nan"))
    ('52.6', '-')
    """
    return "-" if math.isnan(value) else f"{value:.1f}"


def write_json(path: Path, record: Mapping[str, Any]) -> None:
    _parent(path)
    path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_markdown(path: Path, heading: str, tables: Sequence[MetricTable]) -> None:
    _parent(path)
    body = "\n".join(table.to_markdown() for table in tables)
    path.write_text(f"## {heading}\n\n{body}", encoding="utf-8")


def plot_recall_curves(path: Path, curves: Mapping[str, np.ndarray], title: str) -> None:
    """Recall@K (percent) against K = 1..len(curve) on a log axis, one line per ``(K,)`` curve;
    the values at K = 1, 5 and 10 are marked and labelled on the side away from other curves."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 4.8), dpi=120, layout="constrained")
    axes = figure.add_subplot()
    longest = max(len(curve) for curve in curves.values())
    for label, curve in curves.items():
        ks = np.arange(1, len(curve) + 1)
        (line,) = axes.plot(ks, curve, label=label, linewidth=2)
        for k in (k for k in (1, 5, 10) if k <= len(curve)):
            others = [c[k - 1] for c in curves.values() if c is not curve and len(c) >= k]
            above = not others or curve[k - 1] >= max(others)
            axes.plot([k], [curve[k - 1]], "o", color=line.get_color())
            axes.annotate(
                f"{curve[k - 1]:.1f}",
                (k, curve[k - 1]),
                textcoords="offset points",
                xytext=(-3, 6) if above else (3, -7),
                ha="right" if above else "left",
                va="bottom" if above else "top",
                fontsize=8,
                color=line.get_color(),
            )
    axes.set_xscale("log")
    ticks = [k for k in (1, 2, 5, 10, 20, 50, 100) if k <= longest]
    axes.set_xticks(ticks, [str(k) for k in ticks])
    axes.set_xlim(0.8, longest * 1.1)
    axes.set_ylim(0, 100)
    axes.set_xlabel("K")
    axes.set_ylabel("Recall@K (%)")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right")
    _save(figure, path)


def plot_confusion(path: Path, confusion: np.ndarray, classes: Sequence[str], title: str) -> None:
    """A ``(C, C)`` confusion matrix (rows: true class) as row percentages; cells are labelled
    when there are at most 30 classes."""
    from matplotlib.figure import Figure

    totals = confusion.sum(axis=1, keepdims=True)
    share = 100.0 * confusion / np.maximum(totals, 1)
    side = min(4.0 + 0.45 * len(classes), 24.0)
    figure = Figure(figsize=(side + 1.5, side), dpi=120, layout="constrained")
    axes = figure.add_subplot()
    shown = axes.imshow(share, cmap="Blues", vmin=0, vmax=100)
    figure.colorbar(shown, ax=axes, label="% of the true class", shrink=0.8)
    ticks = np.arange(len(classes))
    axes.set_xticks(ticks, classes, rotation=45, ha="right", fontsize=8)
    axes.set_yticks(ticks, classes, fontsize=8)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(title)
    if len(classes) <= 30:
        for (row, column), value in np.ndenumerate(share):
            if value >= 0.5:
                colour = "white" if value > 60 else "black"
                axes.text(
                    column, row, f"{value:.0f}", ha="center", va="center", fontsize=7, color=colour
                )
    _save(figure, path)


def check_plot_path(path: Path) -> None:
    """Refuse a plot path that is not a ``.png`` (before any slow work, not after)."""
    if path.suffix.lower() != ".png":
        raise InputError(f"{path}: plots are written as PNG; give a .png file name")


def _save(figure: Any, path: Path) -> None:
    check_plot_path(path)
    _parent(path)
    figure.savefig(path)


def _parent(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
