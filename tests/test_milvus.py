"""The Milvus backend inside an index (Milvus Lite): persistence across reopening, catching up
after a writer that did not save, check and repair. Skipped without ``mmret[milvus]``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mmret import Item, Retriever
from mmret.encoders.hashing import HashEncoder
from mmret.index.integrity import check_index, repair_index

pytest.importorskip("pymilvus")

DIM = 16


def unit(rows: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((rows, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def items(start: int, stop: int) -> list[Item]:
    return [Item(f"item-{i}", text=f"t{i}", metadata={"odd": i % 2}) for i in range(start, stop)]


def test_an_index_on_milvus_lite_persists_catches_up_and_repairs(tmp_path: Path) -> None:
    folder = tmp_path / "index"
    vectors = unit(300)
    with Retriever.create(folder, encoder=HashEncoder(DIM), backend="milvus") as retriever:
        retriever.add_vectors(items(0, 200), vectors[:200])
        retriever.remove(["item-5", "item-6"])
    assert (folder / "milvus.db").is_dir() and check_index(folder).ok
    writer = Retriever.open(folder)
    writer.add_vectors(items(200, 300), vectors[200:])  # Milvus has them; no record saved
    writer.remove(["item-7"])
    writer._store.close()  # a writer that dies here never saves its record
    writer._writer_lock.release()  # type: ignore[union-attr]
    with Retriever.open(folder) as retriever:
        assert len(retriever) == 297 and len(retriever._backend) == 297
        hits = retriever.search_vectors(vectors[[250, 7, 42]], k=1)
        assert [h[0].id for h in hits] == ["item-250", hits[1][0].id, "item-42"]
        assert hits[1][0].id != "item-7" and hits[0][0].score == pytest.approx(1.0, abs=1e-5)
        odd = retriever.search_vectors(vectors[[42]], k=5, filter={"odd": 1})[0]
        assert len(odd) == 5 and all(hit.metadata["odd"] == 1 for hit in odd)
    assert check_index(folder).ok
    (folder / "milvus-cache.npz").unlink()  # the record lost: the collection is refilled
    repair_index(folder)
    with Retriever.open(folder, readonly=True) as reader:
        assert len(reader._backend) == 297
        assert reader.search_vectors(vectors[[123]], k=1)[0][0].id == "item-123"
