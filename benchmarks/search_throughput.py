"""Search throughput of mmret's backends next to raw numpy / FAISS on the same vectors.

    python benchmarks/search_throughput.py --sizes 10000,100000 --vectors synthetic
    python benchmarks/search_throughput.py --vectors real          # Flickr8k, starter model
    python benchmarks/search_throughput.py --sizes 1000000 --faiss-kind ivf

For each size and backend, queries per second three ways, timed in turns in one run:

* raw: numpy (``queries @ vectors.T`` and an argpartition) for ``exact``; for ``faiss``, the
  structure mmret picks (HNSW-Flat or IVF-Flat, same parameters) built and searched by
  calling FAISS directly;
* backend: mmret's ``VectorIndex.search`` (input checks, key mapping);
* Retriever: ``Retriever.search_vectors``, which also normalises the queries and fetches ids,
  texts and metadata of the hits from SQLite, i.e. everything but text encoding.

Their ratios to raw, and recall@10 against exact search. Queries go in batches (``--batch``;
by default as many as keep the ``(batch, N)`` score matrix near 10^8 floats). Synthetic
vectors are clustered with queries near items, like real embeddings; ``--vectors real`` uses
the starter model's embeddings of Flickr8k (7,000 photos and 30,000 train captions as items,
dev captions as queries) at their natural size: larger sizes are reported as unavailable.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from _common import (
    CONSOLE,
    RESULTS,
    flickr_embeddings,
    interleaved_medians,
    parse_sizes,
    raw_faiss,
    report,
    require_flickr,
    unit_rows,
)
from mmret.encoders.hashing import HashEncoder
from mmret.engine import Retriever
from mmret.index.base import top_k
from mmret.index.exact import ExactIndex
from mmret.index.faiss_ann import FaissIndex
from mmret.items import Item

console = CONSOLE


def synthetic(n: int, n_queries: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """``(n, dim)`` items around ``n / 100`` centres and ``(Q, dim)`` queries near items.

    Uniformly random vectors are the worst case for every ANN method and say little about
    real collections, whose embeddings cluster.
    """
    centres = unit_rows(max(10, n // 100), dim, seed=1)
    vectors = unit_rows(n, dim, seed=3)
    assignment = np.random.default_rng(2).integers(0, len(centres), n)
    for start in range(0, n, 65_536):  # in place, in chunks: 1M x 512 is already 2 GB
        block = vectors[start : start + 65_536]
        block *= 0.6 / np.sqrt(2)
        block += centres[assignment[start : start + 65_536]]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
    queries = vectors[np.random.default_rng(4).integers(0, n, n_queries)]
    queries = queries + 0.3 * unit_rows(n_queries, dim, seed=5)
    return vectors, (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)


def real_collection() -> tuple[np.ndarray, np.ndarray]:
    """Starter embeddings of Flickr8k: items = train+dev photos and train captions (37,000),
    queries = dev captions (5,000), shuffled with a fixed seed."""
    train, dev = flickr_embeddings("train"), flickr_embeddings("dev")
    items = np.concatenate([train.image, dev.image, train.text])
    items = items[np.random.default_rng(0).permutation(len(items))]
    queries = dev.text[np.random.default_rng(1).permutation(len(dev.text))]
    return np.ascontiguousarray(items), np.ascontiguousarray(queries)


def batched_search(
    search: Callable[[np.ndarray], np.ndarray], queries: np.ndarray, batch: int
) -> np.ndarray:
    """``(Q, k)`` row numbers (0-based item positions, -1 for none) over query batches."""
    return np.concatenate([search(queries[s : s + batch]) for s in range(0, len(queries), batch)])


def exact_truth(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """``(Q, k)`` row numbers of the true nearest items, 100 queries at a time."""
    rows = np.arange(len(vectors))
    return batched_search(lambda q: top_k(q @ vectors.T, rows, k)[1], queries, 100)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = [len(set(f[f >= 0]) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits))


def measure(
    name: str,
    vectors: np.ndarray,
    queries: np.ndarray,
    truth: np.ndarray,
    args: argparse.Namespace,
    scratch: Path,
) -> list[Any]:
    n, dim = vectors.shape
    k, batch = args.k, args.batch or max(1, min(len(queries), 10**8 // n))
    options: dict[str, Any] = {"kind": args.faiss_kind} if name == "faiss" else {}
    folder = scratch / f"{name}-{n}"
    items = [Item(f"item-{i}", text=f"item {i}", metadata={"n": i}) for i in range(n)]
    retriever = Retriever.create(
        folder, encoder=HashEncoder(dim), backend=name, backend_options=options
    )
    start = time.perf_counter()
    retriever.add_vectors(items, vectors)
    build_s = time.perf_counter() - start
    del items
    keys = np.arange(1, n + 1, dtype=np.int64)  # a fresh store numbers items 1..n
    if name == "exact":
        backend: ExactIndex | FaissIndex = ExactIndex(dim)
        backend.add(keys, vectors)
        structure = "exact"

        def raw(q: np.ndarray) -> np.ndarray:
            return top_k(q @ vectors.T, keys - 1, k)[1]

    else:
        backend = FaissIndex(dim, **options)
        backend.add(keys, vectors)
        structure = backend.structure
        # The raw reference: the same FAISS structure with the same parameters, built and
        # searched by calling FAISS directly.
        raw_index = raw_faiss(vectors, structure, backend.hnsw_m, backend.ef_construction)
        if structure == "ivf":
            params = faiss.SearchParametersIVF(nprobe=backend.nprobe)
        else:
            params = faiss.SearchParametersHNSW(efSearch=max(backend.ef_search, k))

        def raw(q: np.ndarray) -> np.ndarray:
            return raw_index.search(q, k, params=params)[1]  # type: ignore[no-any-return]

    def bare(q: np.ndarray) -> np.ndarray:
        return backend.search(q, k)[1] - 1

    def full(q: np.ndarray) -> np.ndarray:
        hits = retriever.search_vectors(q, k=k)
        rows = np.full((len(q), k), -1, dtype=np.int64)
        for row, row_hits in zip(rows, hits, strict=True):
            row[: len(row_hits)] = [int(h.id[5:]) for h in row_hits]
        return rows

    paths = {"raw": raw, "backend": bare, "Retriever": full}
    medians = interleaved_medians(
        {p: (lambda f=f: batched_search(f, queries, batch)) for p, f in paths.items()},
        args.repeats,
    )
    recalls = {p: recall(batched_search(f, queries, batch), truth) for p, f in paths.items()}
    retriever.close()
    qps = {p: len(queries) / s for p, s in medians.items()}
    console.print(
        f"  {name:5} n={n:>9,} ({structure}, batch {batch}): built in {build_s:.1f}s, "
        + ", ".join(f"{p} {v:,.0f} q/s" for p, v in qps.items()),
        style="dim",
    )
    return [
        n,
        name,
        structure,
        batch,
        qps["raw"],
        qps["backend"],
        qps["Retriever"],
        qps["backend"] / qps["raw"],
        qps["Retriever"] / qps["raw"],
        recalls["Retriever"],
        recalls["raw"],
        build_s,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=parse_sizes, default=parse_sizes("10000,100000"))
    parser.add_argument("--vectors", choices=("synthetic", "real"), default="synthetic")
    parser.add_argument("--backends", default="exact,faiss")
    parser.add_argument(
        "--faiss-kind",
        choices=("auto", "hnsw", "ivf"),
        default="auto",
        help="FaissIndex kind; auto is what mmret picks (HNSW up to 1M items, IVF above)",
    )
    parser.add_argument("--dim", type=int, default=512, help="synthetic vectors only")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch", type=int, default=0, help="queries per call (0: auto)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.queries, args.repeats = [min(args.sizes[0], 5000)], 200, 2
    args.out = args.out or RESULTS / f"search_throughput_{args.vectors}.json"

    skipped: list[int] = []
    if args.vectors == "real":
        require_flickr()
        pool, query_pool = real_collection()
        skipped = [n for n in args.sizes if n > len(pool)]
        if skipped:
            console.print(
                f"only {len(pool):,} real vectors exist: sizes {skipped} are not available, "
                f"measuring the real collection at its natural size instead",
                style="yellow",
            )
        args.sizes = sorted({min(n, len(pool)) for n in args.sizes})
        query_pool = query_pool[: args.queries]

    rows = []
    for n in args.sizes:
        if args.vectors == "real":
            vectors, queries = pool[:n], query_pool
        else:
            vectors, queries = synthetic(n, args.queries, args.dim)
        truth = exact_truth(vectors, queries, args.k)
        with tempfile.TemporaryDirectory() as scratch:
            for name in args.backends.split(","):
                rows.append(measure(name, vectors, queries, truth, args, Path(scratch)))
    columns = [
        "items",
        "backend",
        "structure",
        "batch",
        "raw q/s",
        "backend q/s",
        "Retriever q/s",
        "backend / raw",
        "Retriever / raw",
        "recall@10",
        "raw recall@10",
        "build s",
    ]
    report(
        f"Search throughput ({args.vectors} vectors): {args.queries} queries, k={args.k}",
        columns,
        rows,
        args.out,
        {
            "vectors": args.vectors,
            "unavailable_sizes": skipped,
            "args": {k: str(v) for k, v in vars(args).items()},
        },
    )


if __name__ == "__main__":
    main()
