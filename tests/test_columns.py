"""Filters from the in-memory metadata columns agree with SQLite's own evaluation (the
reference, ``ItemStore.filter_keys``) for every filter form and awkward value, and searches
with a filter equal brute force over the matching rows, before and after adds, removes and
reopening, on both backends."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mmret import Item, Retriever
from mmret.encoders.hashing import HashEncoder
from mmret.index.columns import MetadataColumns
from mmret.index.store import ItemStore, StoredItem

DIM = 8
BIG = 2**53 + 1  # not exact as a float64
VALUES: list[Any] = [
    *range(-3, 4),
    BIG,
    2**60,
    -(2**60),
    0.5,
    2.0,
    -1.5,
    1e20,
    float(2**60),
    "a",
    "b",
    "ü",
    "1",
    "",
    True,
    False,
    None,
    {"x": 1},
    [1, 2],
]
BOUNDS: list[int | float] = [-2, 0, 1, 2, 2.0, 0.5, 2.5, BIG, float(BIG), 2**60, 1e20, -(2**60)]
KEYS = ["n", "tag", "w.x"]


def metadata(rng: random.Random) -> dict[str, Any]:
    return {key: rng.choice(VALUES) for key in KEYS if rng.random() < 0.85}


def filters(rng: random.Random, count: int) -> list[dict[str, Any]]:
    """Random filters of every form: equality, sets, ranges, several keys at once."""
    scalars = [v for v in VALUES if isinstance(v, int | float | str)]
    found: list[dict[str, Any]] = []
    for _ in range(count):
        filter_: dict[str, Any] = {}
        for key in rng.sample(KEYS, rng.choice([1, 1, 2])):
            form = rng.choice(["eq", "in", "range", "range2"])
            if form == "eq":
                filter_[key] = rng.choice(scalars)
            elif form == "in":
                filter_[key] = rng.sample(scalars, rng.randint(1, 4))
            else:
                ops = rng.sample(["gt", "gte", "lt", "lte"], 1 if form == "range" else 2)
                filter_[key] = {op: rng.choice(BOUNDS) for op in ops}
        found.append(filter_)
    return found


def add(store: ItemStore, rng: random.Random, start: int, n: int) -> None:
    items = [StoredItem(f"i{start + j}", None, None, metadata(rng)) for j in range(n)]
    store.add(items, np.zeros((n, DIM), np.float32))


def test_columns_agree_with_sqlite_through_adds_and_removes(tmp_path: Path) -> None:
    rng = random.Random(0)
    store = ItemStore(tmp_path / "items.sqlite", DIM, create=True)
    columns = MetadataColumns()
    add(store, rng, 0, 300)
    ids = [f"i{j}" for j in range(300)]
    checked = 0
    for round_ in range(6):
        for filter_ in filters(rng, 60):
            with store.snapshot():
                found = columns.matching_keys(store, filter_)
                expected = store.filter_keys(filter_)
            assert found is not None
            np.testing.assert_array_equal(found, expected, err_msg=str(filter_))
            checked += len(expected)
        # Writes between rounds: the columns catch up instead of being read again.
        gone = rng.sample(ids, 40)
        store.remove(gone)
        ids = [i for i in ids if i not in gone]
        add(store, rng, 1000 * (round_ + 1), 50)
        ids += [f"i{1000 * (round_ + 1) + j}" for j in range(50)]
    assert checked > 1000  # the filters matched something, not only empty sets
    with store.snapshot():
        assert columns.matching_keys(store, {}) is None
    store.close()


def test_a_column_is_read_once_then_caught_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ItemStore(tmp_path / "items.sqlite", DIM, create=True)
    add(store, random.Random(1), 0, 100)
    columns = MetadataColumns()
    reads: list[int] = []
    original = store.metadata_values

    def counting(key: str, after: int) -> Any:
        reads.append(after)
        return original(key, after)

    monkeypatch.setattr(store, "metadata_values", counting)
    with store.snapshot():
        columns.matching_keys(store, {"n": 1})
        columns.matching_keys(store, {"n": 2})  # same generation: no read at all
    assert reads == [0]
    add(store, random.Random(2), 100, 5)
    with store.snapshot():
        columns.matching_keys(store, {"n": 1})
    assert reads == [0, 100]  # only the rows added since
    store.close()


def unit(n: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def brute_force_ids(retriever: Retriever, filter_: dict[str, Any], query: np.ndarray) -> list[str]:
    store = retriever.index.store
    with store.snapshot():
        keys = store.filter_keys(filter_)
        all_keys, vectors = store.vectors()
        rows = store.rows(keys.tolist())
    chosen = np.isin(all_keys, keys)
    scores = vectors[chosen] @ query
    order = np.argsort(-scores, kind="stable")[:10]
    return [rows[int(k)].id for k in all_keys[chosen][order]]


@pytest.mark.parametrize("backend", ["exact", "faiss"])
def test_filtered_search_equals_brute_force_over_the_matching_rows(
    tmp_path: Path, backend: str
) -> None:
    rng = random.Random(backend)
    folder = tmp_path / "index"
    Retriever.create(folder, encoder=HashEncoder(DIM), backend=backend).close()
    queries = unit(3, seed=99)
    retriever = Retriever.open(folder, encoder=HashEncoder(DIM))
    next_id = 0
    for stage in ("fresh", "added", "removed", "reopened"):
        if stage in ("fresh", "added"):
            items = [Item(f"i{next_id + j}", text="t", metadata=metadata(rng)) for j in range(200)]
            retriever.add_vectors(items, unit(200, seed=next_id))
            next_id += 200
        elif stage == "removed":
            retriever.remove([f"i{j}" for j in range(0, next_id, 3)])
        else:
            retriever.close()
            retriever = Retriever.open(folder, readonly=True)
        for filter_ in filters(rng, 25):
            for query in queries:
                hits = retriever.search_vectors(query[None, :], k=10, filter=filter_)[0]
                expected = brute_force_ids(retriever, filter_, query)
                assert [hit.id for hit in hits] == expected, (stage, filter_)
    retriever.close()
