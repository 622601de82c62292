"""Long-running use: add, remove, reopen and search in a loop for minutes, then compare search
with brute force over what should be stored, and report memory growth. The collection is
filled to 5,000 items first and then churns at that size (50 added, 50 removed a round), so
memory should stay flat: growth means a leak.

Marked ``slow``: run it with ``.venv/bin/pytest -m slow -s tests/test_soak.py``;
``MMRET_SOAK_SECONDS`` sets the duration per backend (default 120).
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import numpy as np
import pytest

from mmret import Item, Retriever
from mmret.encoders.hashing import HashEncoder

DIM = 32
SECONDS = float(os.environ.get("MMRET_SOAK_SECONDS", "120"))


def resident_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def brute_force(reference: dict[str, np.ndarray], queries: np.ndarray, k: int) -> list[list[str]]:
    ids = list(reference)
    matrix = np.stack([reference[i] for i in ids])
    order = np.argsort(-(queries @ matrix.T), axis=1, kind="stable")[:, :k]
    return [[ids[j] for j in row] for row in order]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["exact", "faiss"])
def test_soak(tmp_path: Path, backend: str) -> None:
    rng = np.random.default_rng(0)
    folder = tmp_path / "index"
    options = {"exact_below": 0} if backend == "faiss" else {}
    retriever = Retriever.create(
        folder, encoder=HashEncoder(DIM), backend=backend, backend_options=options
    )
    reference: dict[str, np.ndarray] = {}
    rounds = next_id = 0
    start_memory = None
    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline:
        vectors = rng.standard_normal((50, DIM)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        items = [Item(f"item-{next_id + j}", text="soak") for j in range(50)]
        next_id += 50
        retriever.add_vectors(items, vectors)
        reference.update({item.id: vector for item, vector in zip(items, vectors, strict=True)})
        churn = 50 if len(reference) > 5_000 else 0
        gone = list(rng.choice(sorted(reference), size=churn, replace=False))
        assert retriever.remove(gone) == churn
        for item_id in gone:
            del reference[item_id]
        hits = retriever.search_vectors(rng.standard_normal((10, DIM)).astype(np.float32), k=10)
        assert all(len(row) == 10 for row in hits)
        rounds += 1
        if rounds % 25 == 0:  # reopen now and then: the saved state must carry on seamlessly
            retriever.close()
            retriever = Retriever.open(folder, encoder=HashEncoder(DIM))
        if rounds == 200:  # filled and churning for a while
            start_memory = resident_mb()
    assert len(retriever) == len(reference)
    queries = rng.standard_normal((200, DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    found = [[hit.id for hit in row] for row in retriever.search_vectors(queries, k=10)]
    truth = brute_force(reference, queries, 10)
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)])
    retriever.close()
    growth = resident_mb() - (start_memory or resident_mb())
    print(
        f"\nsoak[{backend}]: {rounds} rounds in {SECONDS:.0f} s, {len(reference)} items at the "
        f"end, recall@10 vs brute force {recall:.3f}, memory growth {growth:+.1f} MB"
    )
    assert recall == 1.0 if backend == "exact" else recall >= 0.95
    assert growth < 200
