from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mmret import IndexFormatError, InputError, MmretError
from mmret.index.store import ItemStore, StoredItem


def vectors(n: int, dim: int = 4) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, dim)).astype(np.float32)


@pytest.fixture
def store(tmp_path: Path) -> ItemStore:
    return ItemStore(tmp_path / "items.sqlite", dim=4, create=True)


def test_add_rows_vectors_and_generation(store: ItemStore) -> None:
    assert store.generation == 0
    items = [StoredItem("a", "text a", None, {"n": 1}), StoredItem("b", None, "/b.png", {})]
    data = vectors(2)
    keys = store.add(items, data)
    assert keys.tolist() == [1, 2] and len(store) == 2 and store.generation == 1
    rows = store.rows(keys)
    assert rows[1] == items[0] and rows[2] == items[1]
    all_keys, all_vectors = store.vectors()
    np.testing.assert_array_equal(all_keys, keys)
    np.testing.assert_array_equal(all_vectors, data)


def test_keys_are_never_reused(store: ItemStore) -> None:
    store.add([StoredItem("a", "x")], vectors(1))
    store.remove(["a"])
    assert store.add([StoredItem("a", "x")], vectors(1)).tolist() == [2]


def test_failed_transaction_loses_nothing(store: ItemStore) -> None:
    store.add([StoredItem("a", "x")], vectors(1))
    with pytest.raises(InputError, match="UNIQUE constraint failed"):
        store.add([StoredItem("b", "y"), StoredItem("a", "dup")], vectors(2))
    assert len(store) == 1 and store.generation == 1
    assert store.existing_ids(["a", "b"]) == {"a"}


def test_bad_vectors_are_refused(store: ItemStore) -> None:
    with pytest.raises(InputError, match="shape"):
        store.add([StoredItem("a", "x")], vectors(2))
    bad = vectors(1)
    bad[0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        store.add([StoredItem("a", "x")], bad)
    assert len(store) == 0


def test_filters(store: ItemStore) -> None:
    metadata = [
        {"year": 2001, "tag": "a", "ok": True},
        {"year": 2005, "tag": "b", "ok": False},
        {"year": 2010, "tag": "c"},
        {"tag": "a"},
    ]
    store.add([StoredItem(str(i), "t", None, m) for i, m in enumerate(metadata)], vectors(4))
    assert store.filter_keys({"tag": "a"}).tolist() == [1, 4]
    assert store.filter_keys({"tag": ["b", "c"]}).tolist() == [2, 3]
    assert store.filter_keys({"year": {"gte": 2005}}).tolist() == [2, 3]
    assert store.filter_keys({"year": {"gt": 2001, "lt": 2010}}).tolist() == [2]
    assert store.filter_keys({"ok": True}).tolist() == [1]
    assert store.filter_keys({"tag": "a", "year": {"lte": 2001}}).tolist() == [1]
    assert store.filter_keys({"missing": 1}).tolist() == []


def test_many_ids_at_once(store: ItemStore) -> None:
    ids = [f"id{i}" for i in range(2500)]  # more than SQLite's bound-parameter chunk
    store.add([StoredItem(i, "t") for i in ids], vectors(2500))
    assert len(store.existing_ids(ids)) == 2500
    assert len(store.rows(range(1, 2501))) == 2500
    assert len(store.remove(ids[:2000])) == 2000 and len(store) == 500


def test_readonly_missing_database(tmp_path: Path) -> None:
    with pytest.raises(IndexFormatError, match="item database is missing"):
        ItemStore(tmp_path / "none.sqlite", dim=4, readonly=True)


def test_corrupt_database_is_named(tmp_path: Path) -> None:
    path = tmp_path / "items.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(IndexFormatError, match=r"items\.sqlite: not an SQLite database"):
        ItemStore(path, dim=4)


def test_only_create_makes_a_database(tmp_path: Path) -> None:
    path = tmp_path / "items.sqlite"
    with pytest.raises(IndexFormatError, match="item database is missing"):
        ItemStore(path, dim=4)
    path.write_bytes(b"")
    with pytest.raises(IndexFormatError, match="bad header"):
        ItemStore(path, dim=4)
    with pytest.raises(IndexFormatError, match="already exists"):
        ItemStore(path, dim=4, create=True)
    assert not path.read_bytes()  # nothing was written over it


def test_a_full_disk_loses_the_write_only(store: ItemStore) -> None:
    store.add([StoredItem("a", "x")], vectors(1))
    store._db.execute(
        f"PRAGMA max_page_count = {store._db.execute('PRAGMA page_count').fetchone()[0]}"
    )
    big = [StoredItem(f"b{i}", "y" * 5000) for i in range(50)]
    with pytest.raises(MmretError, match="full; nothing of this write was kept"):
        store.add(big, vectors(50))
    store._db.execute("PRAGMA max_page_count = 1000000")
    assert len(store) == 1 and store.recorded_count == 1
    store.add([StoredItem("c", "z")], vectors(1))  # and the next write goes through
    assert len(store) == 2
