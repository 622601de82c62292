"""Search throughput of mmret's backends next to raw numpy / FAISS on the same vectors.

    python benchmarks/search_throughput.py [--n 100000] [--dim 512] [--queries 1000]

For each backend: queries per second through the mmret backend, through the whole Retriever
(search plus fetching ids and metadata from SQLite), and through the raw library call doing
the same search; their ratios; and recall@10 against exact search. Timings are medians of
repeats measured side by side in one run.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import faiss
import numpy as np

from _common import median_seconds, report
from mmret.encoders.hashing import HashEncoder
from mmret.engine import Retriever
from mmret.index.base import top_k
from mmret.index.exact import ExactIndex
from mmret.index.faiss_ann import FaissIndex
from mmret.items import Item


def unit(rows: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(
        np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)])
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/search_throughput.json")
    )
    args = parser.parse_args()

    # Clustered data with queries near items, like real embeddings (random vectors are the
    # worst case for every ANN method and say little about real collections).
    centres = unit(max(10, args.n // 100), args.dim, seed=1)
    vectors = centres[np.random.default_rng(2).integers(0, len(centres), args.n)]
    vectors = vectors + 0.6 * unit(args.n, args.dim, seed=3) / np.sqrt(2)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[np.random.default_rng(4).integers(0, args.n, args.queries)]
    queries = queries + 0.3 * unit(args.queries, args.dim, seed=5)
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    keys = np.arange(1, args.n + 1, dtype=np.int64)
    k = args.k

    def raw_numpy() -> np.ndarray:
        return top_k(queries @ vectors.T, keys, k)[1]

    truth = raw_numpy()

    raw_hnsw = faiss.IndexHNSWFlat(args.dim, 32, faiss.METRIC_INNER_PRODUCT)
    raw_hnsw.hnsw.efConstruction = 64
    raw_hnsw.add(vectors)
    raw_hnsw.hnsw.efSearch = 128

    def raw_faiss() -> np.ndarray:
        return keys[raw_hnsw.search(queries, k)[1]]

    exact = ExactIndex(args.dim)
    exact.add(keys, vectors)
    ann = FaissIndex(args.dim, kind="hnsw")
    ann.add(keys, vectors)

    rows = []
    items = [Item(f"item-{i}", text=f"item {i}", metadata={"n": i}) for i in range(args.n)]
    with tempfile.TemporaryDirectory() as scratch:
        for name, backend, raw in (("exact", exact, raw_numpy), ("faiss", ann, raw_faiss)):
            encoder = HashEncoder(args.dim)  # never called: the vectors are given
            with Retriever.create(Path(scratch) / name, encoder=encoder, backend=name) as retriever:
                retriever.add_vectors(items, vectors)
                raw_s = median_seconds(raw, args.repeats)
                backend_s = median_seconds(lambda b=backend: b.search(queries, k), args.repeats)
                retriever_s = median_seconds(
                    lambda r=retriever: r.search_vectors(queries, k=k), args.repeats
                )
                hits = retriever.search_vectors(queries, k=k)
            found = np.array([[int(h.id.split("-")[1]) + 1 for h in row] for row in hits])
            rows.append(
                [
                    name,
                    args.n,
                    args.queries / raw_s,
                    args.queries / backend_s,
                    args.queries / retriever_s,
                    raw_s / backend_s,
                    raw_s / retriever_s,
                    recall(found, truth),
                    recall(raw(), truth),
                ]
            )
    columns = [
        "backend",
        "items",
        "raw q/s",
        "mmret backend q/s",
        "mmret Retriever q/s",
        "backend / raw",
        "Retriever / raw",
        "recall@10",
        "raw recall@10",
    ]
    report(
        f"Search throughput: {args.queries} queries, k={k}, dim={args.dim}",
        columns,
        rows,
        args.out,
        {"args": {k: str(v) for k, v in vars(args).items()}},
    )


if __name__ == "__main__":
    main()
