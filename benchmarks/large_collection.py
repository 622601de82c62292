"""Large collections on one machine: exact, FAISS (HNSW), ``ivfpq`` and Milvus Lite side by side.

    python benchmarks/large_collection.py --sizes 1M --backends exact,faiss,ivfpq
    python benchmarks/large_collection.py --sizes 10M --backends ivfpq --scratch /big/disk
    python benchmarks/large_collection.py --store 50000 --out results/large_collection_store.json

Vectors (d = 256 by default) are drawn around real embeddings: the starter model's Flickr8k dev
photos and captions (6,000, or ``--centres`` an ``.npy`` of ``(N, 512)`` embeddings), turned to
``dim`` dimensions by a fixed random rotation, each item a centre plus noise, renormalised.
Queries are items plus noise (like ``search_throughput.py``). The collection is generated in
chunks into a float32 file under ``--scratch`` and memory-mapped, so 10M x 256 (10 GB) never
sits in memory; the exact top-10 is one streaming pass over it.

Each backend is built and then searched in a process of its own (resident memory is per
process): ``build s`` and ``build peak RSS`` while building from the file in chunks, ``disk``
what its cache takes, then, reopened in a fresh process, ``RSS`` after the queries (``VmRSS``,
the Python process with numpy and FAISS included; ``base RSS`` is that process before opening),
the median latency of one query at a time on one thread, and recall@10 against exact search.
``ivfpq`` re-scores its candidates with full vectors read by ``pread`` from the float32 file,
row by row, as it reads them from SQLite inside an index: those pages are page cache, not
resident memory of the process. Exact keeps every vector in memory, as the ``exact`` backend
does; past ``--exact-up-to`` items (and FAISS past ``--faiss-up-to``) they are not run, since
their float32 vectors alone outgrow this machine's share of memory. ``milvus`` is Milvus Lite
(in-process, an exact FLAT index: the only kind it builds), its database in the index folder.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from _common import (
    CONSOLE,
    RESULTS,
    flickr_embeddings,
    folder_bytes,
    parse_sizes,
    report,
    reset_peak_rss,
    rss_bytes,
)

_CHUNK = 1 << 20  # rows generated, scanned and added at a time (1 GB at d = 256)
_NOISE = 0.5  # norm of an item's offset from its centre (unit centres)
_QUERY_NOISE = 0.3


def real_centres(path: str | None) -> np.ndarray:
    """``(N, 512)`` real embeddings: ``path``, or the starter model's Flickr8k dev split."""
    if path:
        return np.asarray(np.load(path), dtype=np.float32)
    dev = flickr_embeddings("dev")
    return np.concatenate([dev.image, dev.text]).astype(np.float32)


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def generate(n: int, dim: int, centres: np.ndarray, path: Path) -> None:
    """Write ``(n, dim)`` float32 unit items around the rotated ``centres`` to ``path``."""
    rotation = np.linalg.qr(np.random.default_rng(0).standard_normal((centres.shape[1], dim)))[0]
    projected = _unit(centres @ rotation).astype(np.float32)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    rng = np.random.default_rng(1)
    for start in range(0, n, _CHUNK):
        rows = min(_CHUNK, n - start)
        noise = _unit(rng.standard_normal((rows, dim), dtype=np.float32)) * _NOISE
        noise += projected[rng.integers(0, len(projected), rows)]
        out[start : start + rows] = _unit(noise)
    out.flush()
    del out


def queries_and_truth(data: Path, count: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(Q, dim)`` queries near random items and their exact top ``k`` rows, in one pass over
    the file read a chunk at a time."""
    n, dim = np.load(data, mmap_mode="r").shape
    rng = np.random.default_rng(2)
    picked = np.sort(rng.choice(n, count, replace=False))
    near = RowReader(data, dim)(picked)
    queries = _unit(near + _QUERY_NOISE * _unit(rng.standard_normal(near.shape))).astype(np.float32)
    best_scores = np.full((count, k), -np.inf, np.float32)
    best_rows = np.zeros((count, k), np.int64)
    for keys, vectors in chunks_of(data, n, dim):
        scores = queries @ vectors.T
        joined = np.concatenate([best_scores, scores], axis=1)
        rows = np.concatenate([best_rows, np.broadcast_to(keys, scores.shape)], axis=1)
        top = np.argsort(-joined, axis=1)[:, :k]
        best_scores = np.take_along_axis(joined, top, axis=1)
        best_rows = np.take_along_axis(rows, top, axis=1)
    return queries, best_rows


class RowReader:
    """``(M,)`` sorted row numbers -> ``(M, dim)`` vectors, each row read by ``pread`` from the
    float32 ``.npy`` file (page cache, as SQLite reads its rows; nothing mapped)."""

    def __init__(self, path: Path, dim: int) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        with path.open("rb") as handle:
            np.lib.format.read_magic(handle)
            np.lib.format.read_array_header_1_0(handle)
            self.offset = handle.tell()
        self.row_bytes = dim * 4
        self.dim = dim
        self.rows_read = 0

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        self.rows_read += len(rows)
        size, offset = self.row_bytes, self.offset
        blob = b"".join(os.pread(self.fd, size, offset + int(row) * size) for row in rows)
        return np.frombuffer(blob, dtype=np.float32).reshape(len(rows), self.dim)


def chunks_of(path: Path, n: int, dim: int) -> Any:
    """``(keys, vectors)`` chunks of the file, read (not mapped: mapped pages would count as
    the process's resident memory) into memory a chunk at a time."""
    offset = RowReader(path, dim).offset
    for start in range(0, n, _CHUNK):
        rows = min(_CHUNK, n - start)
        vectors = np.fromfile(path, np.float32, rows * dim, offset=offset + start * dim * 4)
        yield np.arange(start, start + rows), vectors.reshape(rows, dim)


def new_index(backend: str, dim: int, n: int) -> Any:
    from mmret.index.base import new_backend

    return new_backend(backend, {}, dim, n)


def child_build(backend: str, data: Path, folder: Path) -> dict[str, Any]:
    """Build ``backend`` over the file's rows (keys = row numbers) and save its cache."""
    n, dim = np.load(data, mmap_mode="r").shape
    index = new_index(backend, dim, n)
    index.use_stored_vectors(RowReader(data, dim))
    index.load(folder, "bench")  # nothing there yet; Milvus Lite makes its database there
    reset_peak_rss()
    start = time.perf_counter()
    index.build(chunks_of(data, n, dim), n)
    build_s = time.perf_counter() - start
    peak = rss_bytes("VmHWM")
    index.save(folder, "bench", 1)
    return {"build_s": build_s, "build_peak_rss": peak, "save_s": time.perf_counter() - start}


def child_search(
    backend: str,
    data: Path,
    folder: Path,
    saved: dict[str, np.ndarray],
    k: int,
    settings: list[tuple[int, int]],
) -> list[dict[str, Any]]:
    """Reopen the saved cache (or, for exact, read every vector) and time single queries,
    once per ``(nprobe, rescore)`` setting for ``ivfpq``."""
    n, dim = np.load(data, mmap_mode="r").shape
    base = rss_bytes("VmRSS")
    index = new_index(backend, dim, n)
    reader = RowReader(data, dim)
    index.use_stored_vectors(reader)
    start = time.perf_counter()
    if index.load(folder, "bench") is None:  # exact: no cache file, vectors read into memory
        for keys, vectors in chunks_of(data, n, dim):
            index.add(keys, vectors)
    open_s = time.perf_counter() - start
    results = []
    for nprobe, rescore in settings if backend == "ivfpq" else [(0, 0)]:
        if backend == "ivfpq":
            index.nprobe, index.rescore = nprobe, rescore
        reader.rows_read, found, times = 0, [], []
        for query in saved["queries"]:
            begin = time.perf_counter()
            _, keys = index.search(query[None, :], k)
            times.append(time.perf_counter() - begin)
            found.append(keys[0])
        hits = [len(set(f) & set(t)) / k for f, t in zip(found, saved["truth"], strict=True)]
        results.append(
            {
                "setting": f"{nprobe}/{rescore}" if backend == "ivfpq" else "",
                "open_s": open_s,
                "base_rss": base,
                "rss": rss_bytes("VmRSS"),
                "median_ms": 1000 * statistics.median(times),
                "p95_ms": 1000 * float(np.percentile(times, 95)),
                "recall": float(np.mean(hits)),
                "rows_read_per_query": reader.rows_read / len(times),
            }
        )
    return results


def run_child(args: list[str]) -> Any:
    threads = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    env = {**os.environ, **dict.fromkeys(threads, "1")}
    done = subprocess.run(
        [sys.executable, __file__, "--child", *args], env=env, capture_output=True, text=True
    )
    if done.returncode:
        raise RuntimeError(f"child {args[:2]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def settings(args: argparse.Namespace) -> list[tuple[int, int]]:
    """``"32:1024,64:2048"`` -> ``[(32, 1024), (64, 2048)]``: ivfpq's nprobe and rescore."""
    pairs = [part.split(":") for part in args.ivfpq.split(",")]
    return [(int(nprobe), int(rescore)) for nprobe, rescore in pairs]


def child_main(args: argparse.Namespace) -> None:
    import faiss

    import mmret.index  # imported before the base RSS is read: torch comes with it

    faiss.omp_set_num_threads(1)
    assert mmret.index.INDEXES
    data, folder = Path(args.data), Path(args.folder)
    if args.child == "build":
        result = child_build(args.backend, data, folder)
    else:
        with np.load(args.query_file) as saved:
            arrays = {"queries": saved["queries"], "truth": saved["truth"]}
        result = child_search(args.backend, data, folder, arrays, args.k, settings(args))
    print(json.dumps(result))


def store_probe(n: int, dim: int, out: Path) -> None:
    """What the item store costs ``ivfpq``: bytes per item of ``items.sqlite`` and the time to
    read 256 random items' vectors (one query's re-scoring), warm, median of 50."""
    from mmret import Item, Retriever
    from mmret.encoders.hashing import HashEncoder
    from mmret.index.store import ItemStore

    vectors = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    items = [
        Item(f"photos/{i:08d}.jpg", image=f"photos/{i:08d}.jpg", metadata={"n": i % 100})
        for i in range(n)
    ]
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "index"
        with Retriever.create(folder, encoder=HashEncoder(dim), backend="exact") as retriever:
            retriever.add_vectors(items, vectors)
        size = (folder / "items.sqlite").stat().st_size
        store = ItemStore(folder / "items.sqlite", dim, readonly=True)
        rng, times = np.random.default_rng(1), []
        for _ in range(50):
            keys = np.sort(rng.choice(np.arange(1, n + 1), 256, replace=False))
            start = time.perf_counter()
            store.vectors_at(keys)
            times.append(time.perf_counter() - start)
        store.close()
    row = [n, dim, size / n, 1000 * statistics.median(times)]
    columns = ["items", "dim", "items.sqlite B/item", "read 256 vectors ms (median)"]
    report("Item store: size and one query's re-scoring reads", columns, [row], out, {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1M")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--backends", default="exact,faiss,ivfpq")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--centres", help="an .npy of (N, 512) real embeddings")
    parser.add_argument("--scratch", help="folder for the generated vectors (GBs)")
    parser.add_argument("--exact-up-to", type=int, default=2_000_000)
    parser.add_argument("--faiss-up-to", type=int, default=2_000_000)
    parser.add_argument("--milvus-up-to", type=int, default=1_000_000)
    parser.add_argument("--out", default=str(RESULTS / "large_collection.json"))
    parser.add_argument("--store", type=int, default=0, help="only probe an item store of N")
    parser.add_argument("--quick", action="store_true", help="20,000 items, 20 queries")
    parser.add_argument(
        "--ivfpq", default="32:1024", help="ivfpq's nprobe:rescore settings to time, by commas"
    )
    parser.add_argument("--child", choices=["build", "search"], help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--query-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return
    if args.quick:
        args.sizes, args.queries = "20k", 20
    if args.store:
        store_probe(args.store, args.dim, Path(args.out))
        return
    centres = real_centres(args.centres)
    limits = {"exact": args.exact_up_to, "faiss": args.faiss_up_to, "milvus": args.milvus_up_to}
    rows: list[list[Any]] = []
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch_name:
        scratch = Path(scratch_name)
        for n in parse_sizes(args.sizes):
            data = scratch / f"vectors-{n}.npy"
            start = time.perf_counter()
            generate(n, args.dim, centres, data)
            CONSOLE.print(f"{n:,} vectors generated in {time.perf_counter() - start:.0f} s")
            start = time.perf_counter()
            queries, truth = queries_and_truth(data, args.queries, args.k)
            scan_s = time.perf_counter() - start
            CONSOLE.print(f"exact top-{args.k} of {args.queries} queries: one pass, {scan_s:.0f} s")
            saved = scratch / f"queries-{n}.npz"
            np.savez(saved, queries=queries, truth=truth)
            for backend in args.backends.split(","):
                if n > limits.get(backend, n):
                    CONSOLE.print(f"{backend} at {n:,}: not run (float32 vectors in memory)")
                    continue
                folder = scratch / f"{backend}-{n}"
                folder.mkdir()
                common = ["--backend", backend, "--data", str(data), "--folder", str(folder)]
                built = run_child(["build", *common]) if backend != "exact" else {}
                searched = ["search", *common, "--query-file", str(saved), "--k", str(args.k)]
                for found in run_child([*searched, "--ivfpq", args.ivfpq]):
                    row = [
                        n,
                        backend,
                        found["setting"],
                        built.get("build_s", found["open_s"]),
                        built.get("build_peak_rss", found["rss"]) / 2**20,
                        folder_bytes(folder) / 2**20,
                        found["base_rss"] / 2**20,
                        found["rss"] / 2**20,
                        n * args.dim * 4 / 2**20,
                        found["median_ms"],
                        found["p95_ms"],
                        found["recall"],
                        found["rows_read_per_query"],
                    ]
                    CONSOLE.print(row)
                    rows.append(row)
            data.unlink()
    columns = [
        "items",
        "backend",
        "nprobe/rescore",
        "build s",
        "build peak RSS MiB",
        "disk MiB",
        "base RSS MiB",
        "RSS MiB",
        "float32 MiB",
        "query ms (median)",
        "query ms (p95)",
        "recall@10",
        "full rows read/query",
    ]
    extra = {"args": {key: str(value) for key, value in vars(args).items()}}
    report(
        f"Large collections, d={args.dim}, one query at a time, one thread",
        columns,
        rows,
        Path(args.out),
        extra,
    )


if __name__ == "__main__":
    main()
