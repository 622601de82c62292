"""The plaid backend beyond the conformance suite: its stages against brute force on clustered
token sets, training, incremental adds, re-clustering, and its cache in check and repair."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mmret import InputError, Item, Retriever
from mmret.cli.main import app
from mmret.encoders.hashing import TokenHashEncoder
from mmret.index.maxsim import MaxSimIndex
from mmret.index.plaid import PlaidIndex
from mmret.index.plaid_codebook import default_centroids
from mmret.late_interaction import maxsim, normalise_tokens
from mmret.maintenance.integrity import check_index, repair_index
from mmret.maintenance.recluster import recluster_index

TOKENS, TOKEN_DIM = 8, 32
DIM = TOKENS * TOKEN_DIM
#: 16 bytes a token of 32 dimensions (4 bits a dimension): fine enough for these small tests'
#: close calls; the default's recall at 2 bits a dimension is measured by the benchmark.
CODEC = "PQ16"


def clustered(count: int, seed: int, centres: int = 200) -> np.ndarray:
    """``(count, DIM)`` token sets whose tokens lie near ``centres`` shared directions, as
    real token features do (uniform random tokens have no clusters to find)."""
    rng = np.random.default_rng(seed)
    directions = np.random.default_rng(0).standard_normal((centres, TOKEN_DIM))
    picked = directions[rng.integers(0, centres, (count, TOKENS))]
    noisy = picked + 0.3 * rng.standard_normal(picked.shape)
    return normalise_tokens(noisy.reshape(count, DIM).astype(np.float32), TOKEN_DIM)


def recall(found: np.ndarray, expected: np.ndarray) -> float:
    pairs = zip(found, expected, strict=True)
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in pairs]))


@pytest.fixture(scope="module")
def collection() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keys, documents and queries, with exact MaxSim's top 10 computed once."""
    documents = clustered(4000, seed=1)
    return np.arange(4000, dtype=np.int64) * 3 + 1, documents, clustered(30, seed=2)


def exact_top(keys: np.ndarray, documents: np.ndarray, queries: np.ndarray) -> np.ndarray:
    order = np.argsort(-maxsim(queries, documents, TOKEN_DIM), axis=1, kind="stable")[:, :10]
    return keys[order]


def test_stages_keep_the_exact_top_10_on_clustered_data(
    collection: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    keys, documents, queries = collection
    index = PlaidIndex(DIM, token_dim=TOKEN_DIM, exact_below=0, codec=CODEC)
    index.add(keys, documents)
    assert index.centroid_count == default_centroids(len(documents) * TOKENS)
    expected = exact_top(keys, documents, queries)
    trained = index._trained
    assert trained is not None
    # Probing and centroid interaction (stages 1 and 2) keep the true best documents...
    survivors = [
        keys[index._survivors(trained, query.reshape(TOKENS, TOKEN_DIM), None, 10)]
        for query in queries
    ]
    assert recall(np.array(survivors), expected) >= 0.97
    assert max(len(s) for s in survivors) == index.rescore < len(keys) // 10
    # ... and scoring them on decompressed tokens ranks them nearly as exact MaxSim does.
    scores, found = index.search(queries, 10)
    assert recall(found, expected) >= 0.95
    # The final scores are MaxSim on the decompressed tokens, which are close to the tokens.
    decoded = trained.decode(np.arange(len(keys)))
    assert np.abs(decoded - documents).max() < 0.5
    rows = np.searchsorted(keys, found)
    for query, row_scores, row in zip(queries, scores, rows, strict=True):
        np.testing.assert_allclose(
            row_scores, maxsim(query[None], decoded[row], TOKEN_DIM)[0], rtol=1e-4
        )


def test_with_every_document_kept_it_ranks_the_decompressed_tokens_exactly(
    collection: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    keys, documents, queries = collection
    index = PlaidIndex(
        DIM, token_dim=TOKEN_DIM, codec="SQ8", candidates=4000, rescore=4000, exact_below=0
    )
    index.add(keys, documents)
    trained = index._trained
    assert trained is not None
    reference = exact_top(keys, trained.decode(np.arange(len(keys))), queries)
    np.testing.assert_array_equal(index.search(queries, 10)[1], reference)
    assert recall(reference, exact_top(keys, documents, queries)) >= 0.97  # SQ8 is near exact


def test_exact_re_scoring_reads_only_the_best_refine_k_from_the_store(
    collection: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    keys, documents, queries = collection
    # A coarse codec (4 bytes a token of 32 dimensions) ranks near-ties wrongly on its own.
    index = PlaidIndex(DIM, token_dim=TOKEN_DIM, exact_below=0, codec="PQ4", refine=3)
    index.add(keys, documents)
    expected = exact_top(keys, documents, queries)
    coarse = recall(index.search(queries, 10)[1], expected)  # no store: stage 3's ranking
    reads: list[np.ndarray] = []

    def read(wanted: np.ndarray) -> np.ndarray:
        reads.append(wanted)
        return documents[np.searchsorted(keys, wanted)]

    index.use_stored_vectors(read)
    scores, found = index.search(queries, 10)
    assert recall(found, expected) >= 0.97 > coarse
    assert len(reads) == len(queries) and all(len(r) == 30 for r in reads)  # refine * k
    rows = np.searchsorted(keys, found)
    for query, row_scores, row in zip(queries, scores, rows, strict=True):  # exact scores
        np.testing.assert_allclose(
            row_scores, maxsim(query[None], documents[row], TOKEN_DIM)[0], rtol=1e-6
        )
    index.refine, reads[:] = 0, []
    assert recall(index.search(queries, 10)[1], expected) == coarse and not reads  # refine=0


def test_it_searches_exactly_until_it_holds_train_from_documents() -> None:
    documents = clustered(300, seed=3)
    index = PlaidIndex(DIM, token_dim=TOKEN_DIM, train_from=200)
    reference = MaxSimIndex(DIM, token_dim=TOKEN_DIM)
    index.add(np.arange(150), documents[:150])
    reference.add(np.arange(150), documents[:150])
    assert index.centroid_count == 0 and not index.cache_files(Path("/nonexistent"))
    queries = clustered(5, seed=4)
    np.testing.assert_array_equal(index.search(queries, 5)[1], reference.search(queries, 5)[1])
    index.add(np.arange(150, 300), documents[150:])  # crosses train_from: clusters all 300
    assert index.centroid_count > 0 and len(index) == 300
    assert index.search(documents[[10, 250]], 1)[1][:, 0].tolist() == [10, 250]


def test_later_documents_take_the_existing_centroids(
    collection: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    keys, documents, queries = collection
    index = PlaidIndex(DIM, token_dim=TOKEN_DIM, exact_below=0, codec=CODEC)
    index.add(keys[:2000], documents[:2000])
    trained = index._trained
    assert trained is not None
    before = trained.centroids.copy()
    for start in range(2000, 4000, 500):
        index.add(keys[start : start + 500], documents[start : start + 500])
    np.testing.assert_array_equal(trained.centroids, before)
    assert recall(index.search(queries, 10)[1], exact_top(keys, documents, queries)) >= 0.9
    index.remove(keys[::2])
    assert len(index) == 2000
    kept = exact_top(keys[1::2], documents[1::2], queries)
    assert recall(index.search(queries, 10)[1], kept) >= 0.9


def test_bad_options_are_named() -> None:
    with pytest.raises(InputError, match="codec 'PQ7'"):
        PlaidIndex(DIM, token_dim=TOKEN_DIM, codec="PQ7")
    with pytest.raises(InputError, match="rescore"):
        PlaidIndex(DIM, token_dim=TOKEN_DIM, candidates=10, rescore=20)
    with pytest.raises(InputError, match="probes"):
        PlaidIndex(DIM, token_dim=TOKEN_DIM, probes=0)
    with pytest.raises(InputError, match="refine"):
        PlaidIndex(DIM, token_dim=TOKEN_DIM, refine=-1)
    too_fine = PlaidIndex(DIM, token_dim=TOKEN_DIM, codec="PQ8x10", train_from=20)
    with pytest.warns(RuntimeWarning, match="cannot be trained on 160 residuals"):
        too_fine.add(np.arange(20), clustered(20, seed=6))
    assert len(too_fine) == 20 and too_fine.centroid_count == 0  # kept, searched exactly
    assert too_fine.search(clustered(20, seed=6)[[3]], 1)[1][0, 0] == 3
    small = PlaidIndex(DIM, token_dim=TOKEN_DIM, train_from=20)  # auto: fewer bits when small
    small.add(np.arange(20), clustered(20, seed=6))
    assert small.centroid_count > 0 and len(small) == 20


def make_index(folder: Path, count: int) -> Retriever:
    retriever = Retriever.create(
        folder,
        encoder=TokenHashEncoder(TOKENS, TOKEN_DIM),
        backend="plaid",
        backend_options={"train_from": 100, "exact_below": 0},
    )
    items = [Item(f"doc-{i}", text=f"doc {i}", metadata={"even": i % 2 == 0}) for i in range(count)]
    retriever.add_vectors(items, clustered(count, seed=5))
    return retriever


def test_through_the_engine_with_filters_reopen_check_and_repair(tmp_path: Path) -> None:
    folder = tmp_path / "index"
    vectors = clustered(600, seed=5)
    with make_index(folder, 600) as retriever:
        assert retriever.backend_name == "plaid"
        hits = retriever.search_vectors(vectors[[7]], k=3, filter={"even": False})[0]
        assert hits[0].id == "doc-7" and all(int(h.id[4:]) % 2 for h in hits)
        # The engine lets plaid re-score on the stored vectors: the scores are exact MaxSim.
        for hit in retriever.search_vectors(vectors[[11]], k=5)[0]:
            exact = maxsim(vectors[[11]], vectors[[int(hit.id[4:])]], TOKEN_DIM)[0, 0]
            assert hit.score == pytest.approx(exact, rel=1e-5)
        retriever.remove(["doc-7"])
    assert check_index(folder).ok
    with Retriever.open(folder, readonly=True) as reader:
        assert reader.search_vectors(vectors[[8]], k=1)[0][0].id == "doc-8"
        assert "doc-7" not in {h.id for h in reader.search_vectors(vectors[[7]], k=5)[0]}
    for cache in PlaidIndex(DIM).cache_files(folder):
        cache.write_bytes(b"garbage")
    assert any("stale or unreadable" in note for note in check_index(folder).notices)
    assert repair_index(folder).items == 599
    with Retriever.open(folder, readonly=True) as reader:  # rebuilt from the store
        assert reader.search_vectors(vectors[[9]], k=1)[0][0].id == "doc-9"


def test_recluster_swaps_in_new_centroids_while_readers_search(tmp_path: Path) -> None:
    folder = tmp_path / "index"
    vectors = clustered(2000, seed=5)
    with make_index(folder, 150) as writer:  # clustered on its first 150 documents
        writer.add_vectors([Item(f"doc-{i}", text="x") for i in range(150, 2000)], vectors[150:])
    reader = Retriever.open(folder, readonly=True)
    assert reader.index.backend.centroid_count == default_centroids(150 * TOKENS)  # type: ignore[attr-defined]
    report = recluster_index(folder)
    assert report.documents == 2000 and report.centroids == default_centroids(2000 * TOKENS)
    assert reader.search_vectors(vectors[[1500]], k=1)[0][0].id == "doc-1500"  # still serving
    reader.close()
    assert check_index(folder).ok
    with Retriever.open(folder, readonly=True) as fresh:
        assert fresh.index.backend.centroid_count == report.centroids  # type: ignore[attr-defined]
        assert fresh.search_vectors(vectors[[1500]], k=1)[0][0].id == "doc-1500"


def test_recluster_from_the_cli_and_on_an_index_without_centroids(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    make_index(tmp_path / "plaid", 300).close()
    result = CliRunner().invoke(app, ["recluster", str(tmp_path / "plaid"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["documents"] == 300
    Retriever.create(tmp_path / "exact", encoder=TokenHashEncoder(TOKENS, TOKEN_DIM)).close()
    with pytest.raises(InputError, match="no centroids to re-cluster"):
        recluster_index(tmp_path / "exact")
