"""Filters answered from an in-memory, typed copy of the metadata keys they name.

Chosen by measurement (100,000 items, 2-core VM, 2026-11-25): SQLite walking every row's JSON
took 95 ms per filter; an expression index on ``json_extract`` answered a 10 % equality in
11 ms (handing 10,000 keys to Python) and could not serve a range at all; numpy over a typed
column takes 0.2 ms. So a key's column is read from the store the first time a filter names
it (one pass, as one filter cost before) and afterwards brought up to date with the changes
since, as readers do for vectors: new keys are always larger than old ones, and removals are
logged by generation. Keys no filter names are never read, and nothing is written to disk, so
there is no new file to keep crash-safe: the store stays the only truth.

Comparisons are SQLite's for a ``json_extract`` value against a bound parameter (see
:func:`mmret.index.filters.to_sql`, the reference): a missing or null value matches nothing;
integers and reals compare by exact numeric value; text equals text byte for byte and is
greater than any number (so a text value satisfies ``gt``/``gte`` and never ``lt``/``lte``).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import numpy as np

from mmret.index.base import GrowableArray
from mmret.index.filters import Condition, Filter, conditions
from mmret.index.store import ItemStore

_NULL, _INT, _REAL, _TEXT = 0, 1, 2, 3
_KINDS = {int: _INT, float: _REAL, str: _TEXT}
#: Integers beyond this are not exact as float64, so a tie there is settled in Python.
_EXACT_FLOAT_INT = 2**53
_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "eq": operator.eq,
    "gt": operator.gt,
    "gte": operator.ge,
    "lt": operator.lt,
    "lte": operator.le,
}


class _Column:
    """One metadata key's value for every item, typed as SQLite reads it, in key order."""

    def __init__(self) -> None:
        self.keys = GrowableArray(np.int64)
        self.kinds = GrowableArray(np.uint8)
        self.numbers = GrowableArray(np.float64)  # integers and reals (integers rounded)
        self.ints = GrowableArray(np.int64)  # integers exactly (0 elsewhere)
        self.codes = GrowableArray(np.int32)  # texts as codes into ``vocabulary`` (-1 elsewhere)
        self.vocabulary: dict[str, int] = {}
        self.generation = -1
        self.read_up_to = 0  # the largest key ever read: later keys are new items

    def append(self, keys: np.ndarray, values: list[Any]) -> None:
        n = len(values)
        kinds = np.fromiter((_KINDS.get(type(v), _NULL) for v in values), np.uint8, n)
        numbers = np.full(n, np.nan)
        ints = np.zeros(n, np.int64)
        codes = np.full(n, -1, np.int32)
        numeric = np.flatnonzero((kinds == _INT) | (kinds == _REAL))
        numbers[numeric] = [float(values[i]) for i in numeric]
        integral = np.flatnonzero(kinds == _INT)
        ints[integral] = [values[i] for i in integral]
        texts = np.flatnonzero(kinds == _TEXT)
        vocabulary = self.vocabulary
        codes[texts] = [vocabulary.setdefault(values[i], len(vocabulary)) for i in texts]
        for array, part in (
            (self.keys, keys),
            (self.kinds, kinds),
            (self.numbers, numbers),
            (self.ints, ints),
            (self.codes, codes),
        ):
            array.append(part)
        if n:
            self.read_up_to = max(self.read_up_to, int(keys[-1]))

    def remove(self, keys: np.ndarray) -> None:
        if not len(keys):
            return
        keep = ~np.isin(self.keys.view, keys)
        for array in (self.keys, self.kinds, self.numbers, self.ints, self.codes):
            array.keep(keep)

    def mask(self, condition: Condition) -> np.ndarray:
        """``(N,)`` which items satisfy ``condition``."""
        if condition.op == "in":
            mask = np.zeros(len(self.keys), dtype=bool)
            for value in condition.values:
                mask |= self._equal(value)
            return mask
        mask = self._compare(condition.op, condition.values[0])
        if condition.op in ("gt", "gte"):
            mask |= self.kinds.view == _TEXT  # SQLite orders text after every number
        return mask

    def _equal(self, value: Any) -> np.ndarray:
        if isinstance(value, str):
            code = self.vocabulary.get(value)
            if code is None:
                return np.zeros(len(self.keys), dtype=bool)
            return self.codes.view == code  # type: ignore[no-any-return]
        return self._compare("eq", value)

    def _compare(self, op: str, bound: int | float) -> np.ndarray:
        """Numeric values ``op`` ``bound``, exactly: float64 decides every strict inequality
        (rounding never reverses one); ties that rounding may have made are redone in Python,
        whose int/float comparisons are exact, as SQLite's are."""
        kinds, numbers, ints = self.kinds.view, self.numbers.view, self.ints.view
        numeric = (kinds == _INT) | (kinds == _REAL)
        as_float = float(bound)
        mask: np.ndarray = _OPS[op](numbers, as_float) & numeric
        ties = numeric & (numbers == as_float)
        if not (isinstance(bound, int) and abs(bound) > _EXACT_FLOAT_INT):
            ties &= (kinds == _INT) & ((ints > _EXACT_FLOAT_INT) | (ints < -_EXACT_FLOAT_INT))
        for row in np.flatnonzero(ties):
            value = int(ints[row]) if kinds[row] == _INT else float(numbers[row])
            mask[row] = _OPS[op](value, bound)
        return mask


class MetadataColumns:
    """The columns of the keys filters have named so far, for one store (one per Retriever)."""

    def __init__(self) -> None:
        self._columns: dict[str, _Column] = {}

    def matching_keys(self, store: ItemStore, filter_: Filter) -> np.ndarray | None:
        """Inside a store snapshot: sorted keys of the items whose metadata satisfies
        ``filter_`` (``None`` for a filter without conditions: every item)."""
        found = conditions(filter_)  # validates before any work
        if not found:
            return None
        generation = store.generation
        mask: np.ndarray | None = None
        keys = np.empty(0, np.int64)
        for condition in found:
            column = self._current(store, condition.key, generation)
            keys = column.keys.view
            part = column.mask(condition)
            mask = part if mask is None else mask & part
        assert mask is not None
        matching: np.ndarray = keys[mask]
        return matching

    def _current(self, store: ItemStore, key: str, generation: int) -> _Column:
        column = self._columns.get(key)
        if column is None:
            column = self._columns[key] = _Column()
            column.append(*store.metadata_values(key, 0))
        elif column.generation != generation:
            column.remove(store.removed_since(column.generation))
            column.append(*store.metadata_values(key, column.read_up_to))
        column.generation = generation
        return column
