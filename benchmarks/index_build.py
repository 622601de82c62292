"""Index build time, peak memory and disk per item of each backend, next to raw numpy / FAISS.

    python benchmarks/index_build.py --sizes 10000,100000 [--backends exact,faiss]

Each build runs in a fresh child process; "memory per item" is the child's peak resident
memory during the build (Linux ``VmHWM``, reset just before it) minus its resident memory
before (imports, the input vectors), divided by the number of items. Three builds per
backend and size:

* raw: what a user of numpy / FAISS alone would keep, on the same vectors: a contiguous
  float32 copy for ``exact``; for ``faiss``, the structure mmret would pick (HNSW with the
  same M and efConstruction, or IVF-Flat with the same number of lists), built directly;
* backend: mmret's ``VectorIndex.add`` of every vector in one call;
* Retriever: ``Retriever.create`` + ``add_vectors`` in one call: the SQLite item store (ids,
  texts, metadata and vectors), the backend, and the FAISS cache file. Disk per item is the
  index folder's size over the items, and "reopen" the time ``Retriever.open`` and the first
  query's hits take (the backend's cache memory-mapped; imports already done).

Vectors are the clustered synthetic ones of ``search_throughput.py``. Times are medians over
``--repeats`` child processes.
"""

from __future__ import annotations

import argparse
import json
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
    folder_bytes,
    parse_sizes,
    raw_faiss,
    report,
    reset_peak_rss,
    rss_bytes,
)
from search_throughput import synthetic

PATHS = ("raw", "backend", "Retriever")


def build_once(path: str, backend: str, n: int, dim: int, kind: str) -> dict[str, Any]:
    """Run in a child process: build one index, return its time, memory and disk figures."""
    from mmret.encoders.hashing import HashEncoder
    from mmret.engine import Retriever
    from mmret.index.exact import ExactIndex
    from mmret.index.faiss_ann import FaissIndex
    from mmret.items import Item

    vectors, _ = synthetic(n, 1, dim)
    keys = np.arange(1, n + 1, dtype=np.int64)
    items = [Item(f"item-{i}", text=f"item {i}", metadata={"n": i}) for i in range(n)]
    options = {"kind": kind} if backend == "faiss" else {}
    probe = FaissIndex(dim, **options)
    structure = "exact"
    if backend == "faiss":
        structure = probe.kind if probe.kind != "auto" else "ivf" if n > probe.ivf_above else "hnsw"
    built: Any = None
    disk = reopen_s = 0.0
    reset_peak_rss()
    before = rss_bytes("VmRSS")
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        if path == "raw" and backend == "exact":
            built = np.array(vectors, dtype=np.float32, order="C", copy=True)
        elif path == "raw":
            built = raw_faiss(vectors, structure, probe.hnsw_m, probe.ef_construction)
        elif path == "backend":
            built = ExactIndex(dim) if backend == "exact" else FaissIndex(dim, **options)
            built.add(keys, vectors)
        else:
            folder = Path(scratch) / "index"
            with Retriever.create(
                folder, encoder=HashEncoder(dim), backend=backend, backend_options=options
            ) as retriever:
                retriever.add_vectors(items, vectors)
        seconds = time.perf_counter() - start
        peak = rss_bytes("VmHWM")
        if path == "Retriever":
            disk = folder_bytes(folder)
            start = time.perf_counter()
            with Retriever.open(folder, encoder=HashEncoder(dim)) as reopened:
                assert len(reopened.search_vectors(vectors[:1], k=10)[0]) == 10
                reopen_s = time.perf_counter() - start
    return {
        "seconds": seconds,
        "memory": max(0, peak - before),
        "disk": disk,
        "reopen": reopen_s,
        "structure": structure,
    }


def in_child(path: str, backend: str, n: int, dim: int, kind: str) -> dict[str, Any]:
    spec = json.dumps([path, backend, n, dim, kind])
    done = subprocess.run(
        [sys.executable, __file__, "--child", spec], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"build {spec} failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=parse_sizes, default=parse_sizes("10000,100000"))
    parser.add_argument("--backends", default="exact,faiss")
    parser.add_argument("--faiss-kind", choices=("auto", "hnsw", "ivf"), default="auto")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--out", type=Path, default=RESULTS / "index_build.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(build_once(*json.loads(args.child))))
        return
    if args.quick:
        args.sizes, args.repeats = [2000], 1

    rows = []
    for n in args.sizes:
        for backend in args.backends.split(","):
            runs: dict[str, list[dict[str, Any]]] = {path: [] for path in PATHS}
            for _ in range(args.repeats):
                for path in PATHS:  # in turns, so load from other processes hits all alike
                    runs[path].append(in_child(path, backend, n, args.dim, args.faiss_kind))
            med = {
                path: {
                    key: statistics.median(r[key] for r in results)
                    for key in ("seconds", "memory", "disk", "reopen")
                }
                for path, results in runs.items()
            }
            raw_s, backend_s, full_s = (med[p]["seconds"] for p in PATHS)
            rows.append(
                [
                    n,
                    backend,
                    runs["raw"][0]["structure"],
                    raw_s,
                    backend_s,
                    full_s,
                    raw_s / backend_s if raw_s > 1e-3 else "-",
                    n / full_s,
                    med["raw"]["memory"] / n,
                    med["backend"]["memory"] / n,
                    med["Retriever"]["memory"] / n,
                    med["Retriever"]["disk"] / n,
                    med["Retriever"]["reopen"],
                ]
            )
            CONSOLE.print(f"  {backend} n={n:,}: {rows[-1]}", style="dim")
    report(
        f"Index build ({args.dim}-d float32 vectors, {args.repeats} repeats, medians)",
        [
            "items",
            "backend",
            "structure",
            "raw build s",
            "backend build s",
            "Retriever build s",
            "backend / raw speed",
            "Retriever items/s",
            "raw mem B/item",
            "backend mem B/item",
            "Retriever mem B/item",
            "disk B/item",
            "reopen s",
        ],
        rows,
        args.out,
        {"args": {k: str(v) for k, v in vars(args).items() if k != "child"}},
    )


if __name__ == "__main__":
    main()
