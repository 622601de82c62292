"""Metadata filters over each item's JSON metadata, with SQLite's semantics.

A filter maps a metadata key to a condition; all conditions must hold:

* ``{"kind": "photo"}``: equality;
* ``{"kind": ["photo", "scan"]}``: set membership;
* ``{"year": {"gte": 2000, "lt": 2010}}``: numeric range (``gt``, ``gte``, ``lt``, ``lte``).

On the command line the same are written ``kind=photo``, ``kind=photo,scan`` and
``year>=2000`` / ``year<2010`` (see :func:`parse_filter`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mmret.errors import InputError

Filter = Mapping[str, Any]

_RANGE_SQL = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_EXPRESSION = re.compile(r"^\s*([^<>=!\s]+)\s*(>=|<=|=|>|<)\s*(.*?)\s*$")
_CLI_RANGE = {">": "gt", ">=": "gte", "<": "lt", "<=": "lte"}


@dataclass(frozen=True)
class Condition:
    """One test on one metadata key: ``op`` is ``"in"`` (equality is a set of one) or a range
    operator (``gt``, ``gte``, ``lt``, ``lte``); ``values`` are as SQLite compares them
    (booleans as 1 and 0, which is how ``json_extract`` reads JSON ``true`` and ``false``)."""

    key: str
    op: str
    values: tuple[Any, ...]


def conditions(filter_: Filter) -> list[Condition]:
    """Validate a filter and split it into conditions, all of which must hold."""
    found: list[Condition] = []
    for key, condition in filter_.items():
        if not isinstance(key, str) or not _KEY.match(key):
            raise InputError(f"filter key {key!r}: use letters, digits, '_', '-' and '.'")
        if isinstance(condition, Mapping):
            if not condition or set(condition) - set(_RANGE_SQL):
                raise InputError(
                    f"filter on {key!r}: a range takes gt, gte, lt, lte; got {sorted(condition)}"
                )
            for op, bound in condition.items():
                _check_scalar(key, bound, numeric=True)
                found.append(Condition(key, op, (bound,)))
        elif isinstance(condition, Sequence) and not isinstance(condition, str | bytes):
            values = list(condition)
            if not values:
                raise InputError(f"filter on {key!r}: empty set of allowed values")
            for value in values:
                _check_scalar(key, value, numeric=False)
            found.append(Condition(key, "in", tuple(_sql_value(v) for v in values)))
        else:
            _check_scalar(key, condition, numeric=False)
            found.append(Condition(key, "in", (_sql_value(condition),)))
    return found


def json_path(key: str) -> str:
    """The ``json_extract`` path of a top-level metadata key (dots in it are no nesting)."""
    return f'$."{key}"'


def to_sql(filter_: Filter) -> tuple[str, list[Any]]:
    """A ``WHERE`` clause over column ``metadata`` and its parameters: the reference semantics,
    which :mod:`mmret.index.columns` evaluates from its in-memory copy."""
    clauses: list[str] = []
    params: list[Any] = []
    for condition in conditions(filter_):
        path = f"json_extract(metadata, '{json_path(condition.key)}')"
        if condition.op == "in":
            marks = ", ".join("?" * len(condition.values))
            clauses.append(f"{path} IN ({marks})")
        else:
            clauses.append(f"{path} {_RANGE_SQL[condition.op]} ?")
        params.extend(condition.values)
    return " AND ".join(clauses) or "1", params


def _sql_value(value: Any) -> Any:
    # json_extract returns JSON true/false as 1/0.
    return int(value) if isinstance(value, bool) else value


def _check_scalar(key: str, value: Any, *, numeric: bool) -> None:
    allowed: tuple[type, ...] = (int, float) if numeric else (int, float, str, bool)
    if not isinstance(value, allowed) or (numeric and isinstance(value, bool)):
        kind = "a number" if numeric else "a string, number or boolean"
        raise InputError(f"filter on {key!r}: expected {kind}, got {value!r}")
    if isinstance(value, float) and value != value:
        raise InputError(f"filter on {key!r}: NaN is not a valid bound")
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        raise InputError(f"filter on {key!r}: {value} does not fit in 64 bits")


def parse_filter(expressions: Sequence[str]) -> dict[str, Any]:
    """Parse CLI filters: ``key=value``, ``key=a,b,c`` (any of), ``key>=n``, ``key<n`` and so on.

    A bare value matches the value written the same way, whatever type it was stored with:
    ``folder=2017`` matches the string ``"2017"`` (a folder named by year, as a photo library
    stores it) and the number ``2017``, and ``ok=true`` matches ``true`` and ``"true"``. Quotes
    (``"..."`` or ``'...'``) force a string, and keep commas in it: ``folder="2017"`` matches
    only the string. Range bounds are numbers.

    >>> parse_filter(["kind=photo,scan", "year>=2000", "year<2010"])
    {'kind': ['photo', 'scan'], 'year': {'gte': 2000, 'lt': 2010}}
    >>> parse_filter(["folder=2017"])
    {'folder': [2017, '2017']}
    >>> parse_filter(['place="Paris, France"'])
    {'place': 'Paris, France'}
    """
    result: dict[str, Any] = {}
    for expression in expressions:
        match = _EXPRESSION.match(expression)
        if not match or not match.group(3):
            raise InputError(f"filter {expression!r}: expected key=value, key=a,b or key>=number")
        key, op, raw = match.groups()
        if op == "=":
            values = [v for literal in _literals(expression, raw) for v in _spellings(literal)]
            result[key] = values if len(values) > 1 else values[0]
            continue
        bound = _typed(raw)
        if not isinstance(bound, int | float) or isinstance(bound, bool):
            raise InputError(f"filter {expression!r}: {op} needs a number, got {raw!r}")
        existing = result.setdefault(key, {})
        if not isinstance(existing, dict):
            raise InputError(f"filter {expression!r}: {key!r} already has an equality filter")
        existing[_CLI_RANGE[op]] = bound
    return result


# One literal of a comma-separated list: double-quoted, single-quoted or bare.
_LITERAL = re.compile(r"""\s*(?:"([^"]*)"|'([^']*)'|([^,]*?))\s*(?:,|$)""")


@dataclass(frozen=True)
class _Literal:
    text: str
    quoted: bool


def _literals(expression: str, raw: str) -> list[_Literal]:
    found: list[_Literal] = []
    position = 0
    while position < len(raw):
        match = _LITERAL.match(raw, position)
        if not match or match.end() == position:
            raise InputError(f"filter {expression!r}: unbalanced quotes in {raw!r}")
        double, single, bare = match.groups()
        quoted = bare is None
        text = double if double is not None else single if single is not None else bare
        if not quoted and text[:1] in ("'", '"'):
            raise InputError(f"filter {expression!r}: unbalanced quotes in {raw!r}")
        if not text and not quoted:
            raise InputError(f"filter {expression!r}: an empty value in {raw!r}")
        found.append(_Literal(text, quoted))
        position = match.end()
    if raw.rstrip().endswith(","):
        raise InputError(f"filter {expression!r}: an empty value in {raw!r}")
    return found


def _spellings(literal: _Literal) -> list[Any]:
    """The stored values a literal matches: itself as a string, and as the number or boolean
    it spells unless it was quoted."""
    if literal.quoted:
        return [literal.text]
    typed = _typed(literal.text)
    if isinstance(typed, str) or not _is_storable_number(typed):
        return [literal.text]
    return [typed, literal.text]


def _is_storable_number(value: int | float | bool) -> bool:
    """Whether a JSON value can be stored as a number (``NaN``, ``Infinity`` and integers past
    64 bits cannot): only then does a bare literal also match it as a number."""
    if isinstance(value, float):
        return math.isfinite(value)
    return -(2**63) <= value < 2**63


def _typed(raw: str) -> Any:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return raw
    return value if isinstance(value, int | float | bool) else raw
