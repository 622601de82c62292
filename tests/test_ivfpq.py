"""The large-collection backend beyond the conformance battery: exact re-scoring from the item
store, removal from the inverted lists, the memory-mapped cache, and ``auto`` choosing it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mmret import InputError, Item, Retriever
from mmret.encoders.hashing import HashEncoder
from mmret.index.base import AUTO_IVFPQ_FROM_BYTES, new_backend
from mmret.index.ivfpq import IvfPqIndex
from mmret.maintenance.integrity import check_index, repair_index

DIM = 32
OPTIONS = {"train_from": 500, "pq": 4, "nprobe": 64, "rescore": 64}


def clustered(rows: int, seed: int = 0) -> np.ndarray:
    """``(rows, DIM)`` unit vectors around 20 centres, like embeddings."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, DIM)).astype(np.float32)
    vectors = centres[rng.integers(0, 20, rows)] + 0.5 * rng.standard_normal((rows, DIM))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def test_candidates_are_rescored_exactly_from_the_source_reading_only_them() -> None:
    vectors = clustered(3000)
    keys = np.arange(3000, dtype=np.int64) * 3 + 1
    index = IvfPqIndex(DIM, **OPTIONS)  # type: ignore[arg-type]
    reads: list[int] = []

    def source(wanted: np.ndarray) -> np.ndarray:
        reads.append(len(wanted))
        assert np.all(np.diff(wanted) > 0)  # sorted, each read once
        return vectors[np.searchsorted(keys, wanted)]

    index.use_stored_vectors(source)
    index.add(keys, vectors)
    assert index.trained and len(index) == 3000
    queries = clustered(5, seed=1)
    scores, found = index.search(queries, 10)
    assert sum(reads) <= 5 * OPTIONS["rescore"]  # the candidates, not the collection
    exact = np.einsum("qkd,qd->qk", vectors[np.searchsorted(keys, found)], queries)
    np.testing.assert_allclose(scores, exact, rtol=1e-5)  # exact scores, not PQ estimates
    truth = keys[np.argsort(-(queries @ vectors.T), axis=1)[:, :10]]
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)])
    assert recall >= 0.9


def test_removed_items_leave_the_lists_and_the_rest_stay_searchable() -> None:
    vectors = clustered(1200)
    index = IvfPqIndex(DIM, **OPTIONS)  # type: ignore[arg-type]
    index.add(np.arange(1000), vectors[:1000])
    index.remove(np.arange(0, 900, 10))
    index.remove(np.arange(900))  # most of it: no compaction, codes are deleted in place
    index.add(np.arange(1000, 1200), vectors[1000:])
    assert len(index) == 300 and index.stored_keys().tolist() == list(range(900, 1200))
    _, found = index.search(vectors[[950, 1100]], 1)
    assert found[:, 0].tolist() == [950, 1100]
    _, everything = index.search(vectors[:1], 1000)
    assert set(everything[0][everything[0] >= 0].tolist()) <= set(range(900, 1200))


def test_below_train_from_rows_are_searched_exactly() -> None:
    index = IvfPqIndex(DIM, **OPTIONS)  # type: ignore[arg-type]
    index.add(np.arange(100), clustered(100))
    assert not index.trained
    _, found = index.search(clustered(100)[[7]], 1)
    assert found[0, 0] == 7


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"pq": 5}, "must divide"),
        ({"nprobe": 0}, "nprobe"),
        ({"nlist": -1}, "nlist"),
        ({"train_from": 100}, "train_from must be at least 256"),
    ],
)
def test_bad_options_are_named(options: dict[str, int], message: str) -> None:
    with pytest.raises(InputError, match=message):
        IvfPqIndex(DIM, **options)


def test_auto_picks_ivfpq_once_float32_vectors_outgrow_the_budget() -> None:
    below = AUTO_IVFPQ_FROM_BYTES // (256 * 4) - 1
    assert new_backend("auto", {}, 256, below).name == "faiss"
    assert new_backend("auto", {}, 256, below + 1).name == "ivfpq"
    assert new_backend("auto", {}, 256, 50_000).name == "exact"


def test_an_index_rescores_from_its_store_through_reopening_check_and_repair(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "index"
    vectors = clustered(1500)
    items = [Item(f"item-{i}", text=f"t{i}", metadata={"n": i % 7}) for i in range(1500)]
    with Retriever.create(
        folder, encoder=HashEncoder(DIM), backend="ivfpq", backend_options=OPTIONS
    ) as retriever:
        retriever.add_vectors(items[:1000], vectors[:1000])
        retriever.add_vectors(items[1000:], vectors[1000:])
        retriever.remove([f"item-{i}" for i in range(10)])
    cached = {path.name for path in IvfPqIndex(DIM).cache_files(folder)}
    assert "ivfpq-cache.npz" in cached and len(cached) == 2
    with np.load(folder / "ivfpq-cache.npz") as record:
        assert "vectors" not in record.files  # the store holds them, not the cache
    assert check_index(folder).ok
    with Retriever.open(folder, readonly=True) as reader:
        backend = reader.index.backend
        assert isinstance(backend, IvfPqIndex) and backend._mapped is not None  # mmapped codes
        hits = reader.search_vectors(vectors[[42, 1400]], k=3)
        assert [h[0].id for h in hits] == ["item-42", "item-1400"]
        assert all(h[0].score == pytest.approx(1.0, abs=1e-5) for h in hits)
        filtered = reader.search_vectors(vectors[[42]], k=5, filter={"n": 0})[0]
        assert filtered and all(hit.metadata["n"] == 0 for hit in filtered)
        assert reader.search_vectors(vectors[[3]], k=1)[0][0].id != "item-3"  # removed
    for path in IvfPqIndex(DIM).cache_files(folder):
        path.unlink()
    repair_index(folder)
    assert check_index(folder).ok
    with Retriever.open(folder, readonly=True) as reader:
        assert len(reader) == 1490
        assert reader.search_vectors(vectors[[700]], k=1)[0][0].id == "item-700"


def test_cli_passes_backend_options_and_names_a_malformed_one(
    tmp_path: Path, photo_folder: Path
) -> None:
    import json

    from .cli import run

    out = tmp_path / "cli"
    run(
        "index",
        photo_folder,
        "--out",
        out,
        "--model",
        "hash:32",
        "--backend",
        "ivfpq",
        "--backend-option",
        "train_from=300",
        "--backend-option",
        "nprobe=8",
        "--json",
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend_options"] == {"train_from": 300, "nprobe": 8}
    error = run("index", photo_folder, "--out", tmp_path / "bad", "--backend-option", "uri", code=1)
    assert "expected KEY=VALUE" in error


def test_an_index_filled_a_batch_at_a_time_is_retrained_with_more_lists() -> None:
    vectors = clustered(1200)
    index = IvfPqIndex(DIM, train_from=300, pq=4, nprobe=64)
    index.add(np.arange(300), vectors[:300])
    lists = index._index.nlist
    for start in range(300, 1200, 100):
        index.add(np.arange(start, start + 100), vectors[start : start + 100])
    assert index._index.nlist >= 4 * lists and len(index) == 1200
    _, found = index.search(vectors[[5, 1150]], 1)
    assert found[:, 0].tolist() == [5, 1150]
