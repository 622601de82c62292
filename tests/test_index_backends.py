"""One conformance battery for every vector backend, checked against brute force."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from mmret import InputError
from mmret.index.base import INDEXES, VectorIndex
from mmret.index.exact import ExactIndex
from mmret.index.faiss_ann import FaissIndex
from mmret.index.ivfpq import IvfPqIndex
from mmret.index.maxsim import MaxSimIndex
from mmret.index.milvus import MilvusIndex
from mmret.index.milvus_maxsim import MilvusMaxSimIndex
from mmret.index.plaid import PlaidIndex
from mmret.late_interaction import normalise_tokens, similarity

DIM = 16
#: Multi-vector backends hold sets of this many tokens of DIM dimensions.
TOKENS = 4

PLAID = {"token_dim": DIM, "train_from": 256, "codec": "SQ8", "candidates": 2048, "rescore": 1024}
BACKENDS: dict[str, Callable[[], VectorIndex]] = {
    "exact": lambda: ExactIndex(DIM),
    # exact_below=0 sends every filter allowing 5 % of the items or more through the
    # approximate structures (below that, every backend scores the allowed rows directly).
    "faiss-hnsw": lambda: FaissIndex(DIM, kind="hnsw", exact_below=0, ef_search=256),
    "faiss-ivf": lambda: FaissIndex(DIM, kind="ivf", exact_below=0, nprobe=64),
    "faiss-filtered-exact": lambda: FaissIndex(DIM, kind="hnsw"),
    # Trained from the first 1,500 rows (32 lists), codes of 8 bytes; half the lists probed.
    "ivfpq": lambda: IvfPqIndex(DIM, train_from=1000, pq=8, nprobe=16, exact_below=0),
    "maxsim": lambda: MaxSimIndex(TOKENS * DIM, token_dim=DIM),
    # Clustered from 256 documents on, so the suite's collections are searched compressed;
    # exact_below=0 sends filters allowing 5 % or more through the probing stages. Uniformly
    # random tokens are PLAID's worst case (no clusters): a fine codec and wide probing keep
    # this a test of the logic, not of compression (benchmarks/multivector.py measures that).
    "plaid": lambda: PlaidIndex(TOKENS * DIM, exact_below=0, **PLAID),
    "plaid-filtered-exact": lambda: PlaidIndex(TOKENS * DIM, **PLAID),
}
try:  # an optional extra: pip install 'mmret[milvus]'
    import pymilvus  # noqa: F401

    BACKENDS["milvus"] = lambda: MilvusIndex(DIM)  # Milvus Lite, in a private temporary folder
    # Late interaction: tokens as rows; exact_below=0 sends every filter through token search.
    BACKENDS["milvus-maxsim"] = lambda: MilvusMaxSimIndex(TOKENS * DIM, DIM, exact_below=0)
except ImportError:
    pass
#: Backends that store compressed vectors: their scores are close to exact, not equal.
LOSSY = (PlaidIndex,)


def token_dim(index: VectorIndex | None) -> int | None:
    """The index's token size, ``None`` for single-vector backends (and no index)."""
    return DIM if index is not None and index.multi_vector else None


def unit(rows: int, seed: int = 0, index: VectorIndex | None = None) -> np.ndarray:
    """``(rows, index.dim)`` random rows made unit as the index's kind expects: whole rows,
    or each of ``TOKENS`` tokens for a multi-vector index."""
    width = DIM if index is None else index.dim
    vectors = np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)
    return normalise_tokens(vectors, token_dim(index))


def self_score(index: VectorIndex) -> float:
    """A stored row's score as its own query: 1, or one per token under MaxSim."""
    return float(TOKENS if index.multi_vector else 1)


def brute_force(
    vectors: np.ndarray, keys: np.ndarray, queries: np.ndarray, k: int, index: VectorIndex
) -> np.ndarray:
    scores = similarity(queries, vectors, token_dim(index))
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return keys[order]


def overlap(found: np.ndarray, expected: np.ndarray) -> float:
    return float(
        np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, expected, strict=True)])
    )


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> VectorIndex:
    return BACKENDS[request.param]()


@pytest.fixture
def filled(backend: VectorIndex) -> tuple[VectorIndex, np.ndarray, np.ndarray]:
    vectors = unit(2000, index=backend)
    keys = np.arange(2000, dtype=np.int64) * 2 + 10  # sparse, increasing, like store keys
    backend.add(keys[:1500], vectors[:1500])
    backend.add(keys[1500:], vectors[1500:])  # incremental add
    return backend, keys, vectors


def test_registry_knows_every_backend() -> None:
    assert {"exact", "faiss", "maxsim"} <= set(INDEXES)


def test_search_matches_brute_force(filled: tuple[VectorIndex, np.ndarray, np.ndarray]) -> None:
    index, keys, vectors = filled
    queries = unit(20, seed=1, index=index)
    scores, found = index.search(queries, 10)
    assert scores.shape == found.shape == (20, 10)
    assert len(index) == 2000
    assert overlap(found, brute_force(vectors, keys, queries, 10, index)) >= 0.9
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first


def test_exact_hits_score_one(filled: tuple[VectorIndex, np.ndarray, np.ndarray]) -> None:
    index, keys, vectors = filled
    scores, found = index.search(vectors[[3, 1700]], 1)
    assert found[:, 0].tolist() == [keys[3], keys[1700]]
    tolerance = 0.1 * self_score(index) if isinstance(index, LOSSY) else 1e-5
    np.testing.assert_allclose(scores[:, 0], self_score(index), atol=tolerance)


def test_remove(filled: tuple[VectorIndex, np.ndarray, np.ndarray]) -> None:
    index, keys, vectors = filled
    gone = keys[::3]
    index.remove(gone)
    index.remove(np.array([999_999]))  # unknown keys are ignored
    assert len(index) == 2000 - len(gone)
    _, found = index.search(vectors[::3][:50], 5)
    assert not set(found.ravel()) & set(gone.tolist())
    kept = np.setdiff1d(keys, gone)
    queries = unit(10, seed=2, index=index)
    expected = brute_force(vectors[np.isin(keys, kept)], kept, queries, 10, index)
    assert overlap(index.search(queries, 10)[1], expected) >= 0.9


def test_remove_most_then_add_more(backend: VectorIndex) -> None:
    vectors = unit(600, index=backend)
    keys = np.arange(600, dtype=np.int64)
    backend.add(keys[:500], vectors[:500])
    backend.remove(keys[:400])  # past the compaction threshold
    backend.add(keys[500:], vectors[500:])
    assert len(backend) == 200
    _, found = backend.search(vectors[[450, 550]], 1)
    assert found[:, 0].tolist() == [450, 550]


def test_filtered_search(filled: tuple[VectorIndex, np.ndarray, np.ndarray]) -> None:
    index, keys, vectors = filled
    allowed = keys[100:900:4]
    queries = unit(10, seed=3, index=index)
    _scores, found = index.search(queries, 5, allowed)
    assert set(found.ravel()) <= set(allowed.tolist())
    mask = np.isin(keys, allowed)
    assert overlap(found, brute_force(vectors[mask], keys[mask], queries, 5, index)) >= 0.9


@pytest.mark.parametrize("share", [0.01, 0.04, 0.3, 0.9])
def test_filtered_search_at_every_selectivity(
    filled: tuple[VectorIndex, np.ndarray, np.ndarray], share: float
) -> None:
    """Selective filters (scored directly) are exact; looser ones (the structure searched with
    the allowed set: a masked full pass for exact, an ID selector for FAISS) keep recall."""
    index, keys, vectors = filled
    allowed = np.sort(np.random.default_rng(7).choice(keys, int(share * len(keys)), False))
    queries = unit(10, seed=8, index=index)
    _scores, found = index.search(queries, 10, allowed)
    mask = np.isin(keys, allowed)
    expected = brute_force(vectors[mask], keys[mask], queries, 10, index)
    assert set(found.ravel()) <= set(allowed.tolist())
    if (share < 0.05 or isinstance(index, ExactIndex)) and not isinstance(index, LOSSY):
        np.testing.assert_array_equal(found, expected)
    else:
        assert overlap(found, expected) >= 0.9


def test_k_larger_than_candidates_is_padded(backend: VectorIndex) -> None:
    backend.add(np.array([1, 2, 3]), unit(3, index=backend))
    scores, found = backend.search(unit(2, seed=4, index=backend), 5)
    assert found.shape == (2, 5)
    assert (found[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
    assert set(found[:, :3].ravel()) == {1, 2, 3}
    _, none = backend.search(unit(1, index=backend), 3, allowed=np.array([], dtype=np.int64))
    assert (none == -1).all()
    scores, two = backend.search(
        unit(1, index=backend), 5, allowed=np.array([1, 3])
    )  # most items allowed
    assert (
        set(two[0, :2]) == {1, 3} and (two[0, 2:] == -1).all() and np.isneginf(scores[0, 2:]).all()
    )


def test_empty_index(backend: VectorIndex) -> None:
    _scores, found = backend.search(unit(2, index=backend), 3)
    assert (found == -1).all() and len(backend) == 0


def test_bad_inputs_are_rejected(backend: VectorIndex) -> None:
    backend.add(np.array([5]), unit(1, index=backend))
    with pytest.raises(InputError, match="shape"):
        backend.add(np.array([6]), np.zeros((1, backend.dim + 1), np.float32))
    with pytest.raises(InputError, match="increasing"):
        backend.add(np.array([4]), unit(1, index=backend))
    with pytest.raises(InputError, match="queries must have shape"):
        backend.search(np.zeros((1, 3), np.float32), 1)
    with pytest.raises(InputError, match="NaN"):
        backend.search(np.full((1, backend.dim), np.nan, np.float32), 1)
    with pytest.raises(InputError, match="k must be"):
        backend.search(unit(1, index=backend), 0)
    assert len(backend) == 1  # nothing was lost


def test_save_and_load_cache(
    filled: tuple[VectorIndex, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    index, keys, _vectors = filled
    index.remove(keys[:10])
    index.save(tmp_path, "epoch-1", generation=7)
    fresh = same_kind(index)
    restored = fresh.load(tmp_path, "epoch-1")
    if restored is None:  # backends without a cache are rebuilt from the store instead
        assert isinstance(index, ExactIndex)
        return
    assert len(fresh) == len(index)
    queries = unit(5, seed=5, index=index)
    np.testing.assert_array_equal(fresh.search(queries, 5)[1], index.search(queries, 5)[1])
    assert restored == 7 and fresh.last_key == index.last_key
    assert same_kind(index).load(tmp_path, "epoch-2") is None  # another store's cache


def test_damaged_cache_is_ignored(tmp_path: Path) -> None:
    index = FaissIndex(DIM)
    index.add(np.arange(50), unit(50))
    index.save(tmp_path, "epoch", generation=1)
    (tmp_path / "faiss-cache.npz").write_bytes(b"garbage")
    assert FaissIndex(DIM).load(tmp_path, "epoch") is None


def test_auto_kind_picks_by_size() -> None:
    small = FaissIndex(DIM, ivf_above=100)
    small.add(np.arange(50), unit(50))
    assert small.structure == "hnsw"
    large = FaissIndex(DIM, ivf_above=100)
    large.add(np.arange(500), unit(500))
    assert large.structure == "ivf"


def test_unknown_faiss_kind() -> None:
    with pytest.raises(InputError, match="faiss kind must be one of"):
        FaissIndex(DIM, kind="lsh")


def same_kind(index: VectorIndex) -> VectorIndex:
    return INDEXES.get(index.name)(index.dim, **index.config())


def test_exact_search_in_blocks_of_queries_matches_one_block(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mmret.index import exact

    index = ExactIndex(DIM)
    index.add(np.arange(1, 101), unit(100))
    queries = unit(9, seed=9)
    whole = index.search(queries, 5)
    monkeypatch.setattr(exact, "_SCORES_PER_BLOCK", 250)  # 2 queries a block
    scores, keys = index.search(queries, 5)
    np.testing.assert_array_equal(keys, whole[1])
    np.testing.assert_allclose(scores, whole[0], rtol=1e-6)  # BLAS sums blocks differently
    assert index.search(queries[:0], 5)[0].shape == (0, 5)


@pytest.mark.parametrize("threshold", [0, 1 << 40])
def test_exact_scores_agree_with_one_or_many_blas_threads(
    threshold: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmret.index import exact

    monkeypatch.setattr(exact, "_ONE_THREAD_BELOW", threshold)
    queries, vectors = unit(7, seed=1), unit(50, seed=2)
    np.testing.assert_allclose(exact.scores(queries, vectors), queries @ vectors.T, rtol=1e-6)


def test_a_loaded_cache_is_mapped_and_still_takes_writes(
    filled: tuple[VectorIndex, np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """Caches are memory-mapped on load; adding or removing afterwards copies what it must."""
    index, keys, vectors = filled
    index.save(tmp_path, "epoch", generation=1)
    index.save(tmp_path, "epoch", generation=2)  # replaces the data file, leaves no orphan
    assert len(index.cache_files(tmp_path)) == 2  # the record and one data file
    loaded = same_kind(index)
    assert loaded.load(tmp_path, "epoch") == 2
    extra = unit(30, seed=11, index=index)
    loaded.add(np.arange(30) + keys[-1] + 1, extra)
    loaded.remove(keys[:5])
    _, found = loaded.search(np.concatenate([extra[:2], vectors[5:6]]), 1)
    assert found[:, 0].tolist() == [keys[-1] + 1, keys[-1] + 2, keys[5]]
    assert len(loaded) == len(keys) + 30 - 5


def test_a_faiss_cache_in_the_old_single_file_layout_still_loads(tmp_path: Path) -> None:
    import io

    import faiss

    index = FaissIndex(DIM)
    index.add(np.arange(50), unit(50))
    buffer = io.BytesIO()
    np.savez(
        buffer,
        index=faiss.serialize_index(index._index),
        keys=np.arange(50),
        alive=np.ones(50, bool),
        epoch=np.str_("epoch"),
        generation=np.int64(3),
    )
    (tmp_path / "faiss-cache.npz").write_bytes(buffer.getvalue())
    old = FaissIndex(DIM)
    assert old.load(tmp_path, "epoch") == 3 and len(old) == 50 and old.cache_outdated
    assert old.search(unit(50)[7:8], 1)[1][0, 0] == 7
