"""End-to-end query latency: a text string in, ranked results out, with one model.

    python benchmarks/query_latency.py [--model starter-v3] [--queries 200] [--repeats 3]
        [--backends exact,faiss]

The collection is the Flickr8k photos of ``--splits`` (train+dev: 7,000; their embeddings by
``--model``, default the default model, are cached after the first run), queried one dev caption
at a time, ``k=10``: what one user of the CLI or server waits for. Without ``../shared/data``
it falls back to the demo's scikit-image photos. For each backend, over every query and
repeat:

* end to end: ``Retriever.search([text])``, p50 and p95;
* its parts, timed separately on the same query: text encoding (``Encoder.encode``), vector
  search (the bare backend), and vector search plus store lookup (``Retriever.search_vectors``:
  the search, the SQLite fetch of the hits, building the results);
* 20 untimed queries first warm the model's thread pools and caches up;
* cold start: ``Retriever.open`` of the folder plus the first query, loading the model
  (measured once, for the first backend, in a fresh process).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from _common import CONSOLE, FLICKR, RESULTS, flickr_embeddings, report
from mmret.demo import TEXT_QUERIES, write_photos
from mmret.encoders import DEFAULT_MODEL, load_encoder
from mmret.engine import Retriever
from mmret.index.base import VectorIndex
from mmret.index.exact import ExactIndex
from mmret.index.faiss_ann import FaissIndex
from mmret.ingest.pairs import read_pairs
from mmret.ingest.sources import read_items
from mmret.items import Item, Query


def collection(
    scratch: Path, splits: list[str], model: str
) -> tuple[list[Item], np.ndarray, list[str], str]:
    """Items, their ``(N, dim)`` embeddings by ``model``, query captions, and a description."""
    if (FLICKR / "dev.jsonl").is_file():
        pairs = [read_pairs(FLICKR / f"{split}.jsonl") for split in splits]
        items = [
            Item(image_id, image=str(path))
            for pair in pairs
            for image_id, path in zip(pair.image_ids, pair.images, strict=True)
        ]
        vectors = np.concatenate([flickr_embeddings(s, model).image for s in splits])
        captions = list(read_pairs(FLICKR / "dev.jsonl").texts)
        order = np.random.default_rng(0).permutation(len(captions))
        return items, vectors, [captions[i] for i in order], f"{len(items):,} Flickr8k photos"
    CONSOLE.print(f"no Flickr8k at {FLICKR}: using the demo's photos instead", style="yellow")
    items = list(read_items(write_photos(scratch / "photos")))
    vectors = load_encoder(model).encode(items)
    return items, vectors, list(TEXT_QUERIES), f"{len(items)} scikit-image photos"


def bare_backend(retriever: Retriever, vectors: np.ndarray) -> VectorIndex:
    """The Retriever's kind of backend on its own, holding the same vectors."""
    dim, options = retriever.manifest.dim, retriever.manifest.backend_options
    index: VectorIndex = (
        FaissIndex(dim, **options) if retriever.backend_name == "faiss" else ExactIndex(dim)
    )
    index.add(np.arange(1, len(vectors) + 1, dtype=np.int64), vectors)  # a fresh store's keys
    return index


def time_queries(
    retriever: Retriever, index: VectorIndex, captions: list[str], k: int, repeats: int
) -> dict[str, list[float]]:
    """Seconds per query of each path, every query timed on all paths in turn."""
    encoder = retriever.encoder
    vectors = encoder.encode([Query(text=c) for c in captions])
    times: dict[str, list[float]] = {"e2e": [], "encode": [], "search": [], "vec": []}
    warm_up = list(zip(captions, vectors, strict=True))[:20]
    for round_ in range(repeats + 1):
        for text, vector in warm_up if round_ == 0 else zip(captions, vectors, strict=True):
            query = vector[None, :]
            for name, run in (
                ("e2e", lambda t=text: retriever.search([t], k=k)),
                ("encode", lambda t=text: encoder.encode([Query(text=t)])),
                ("search", lambda q=query: index.search(q, k)),
                ("vec", lambda q=query: retriever.search_vectors(q, k=k)),
            ):
                elapsed = timed(run)[0]
                if round_:  # round 0 only warms caches and thread pools up
                    times[name].append(elapsed)
    return times


def timed(run: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = run()
    return time.perf_counter() - start, value


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--backends", default="exact,faiss")
    parser.add_argument(
        "--splits", default="train,dev", help="Flickr8k splits whose photos are indexed"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--out", type=Path, default=RESULTS / "query_latency.json")
    args = parser.parse_args()
    if args.quick:
        args.queries, args.repeats = 20, 1

    rows = []
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        items, item_vectors, captions, source = collection(
            scratch, args.splits.split(","), args.model
        )
        captions = captions[: args.queries]
        for number, backend in enumerate(args.backends.split(",")):
            folder = scratch / backend
            with Retriever.create(folder, model=args.model, backend=backend) as retriever:
                retriever.add_vectors(items, item_vectors)
            with Retriever.open(folder, readonly=True) as retriever:
                cold_s = "-"
                if number == 0:  # nothing has loaded the model's towers in this process yet
                    cold_s, _ = timed(lambda r=retriever: r.search(captions[:1], k=args.k))
                index = bare_backend(retriever, item_vectors)
                times = time_queries(retriever, index, captions, args.k, args.repeats)
            ms = {name: [1000 * t for t in values] for name, values in times.items()}
            rows.append(
                [
                    backend,
                    index.structure if isinstance(index, FaissIndex) else "exact",
                    len(ms["e2e"]),
                    percentile(ms["e2e"], 50),
                    percentile(ms["e2e"], 95),
                    statistics.median(ms["encode"]),
                    statistics.median(ms["search"]),
                    statistics.median(ms["vec"]),
                    cold_s,
                ]
            )
    report(
        f"End-to-end text query latency, {args.model}, k={args.k}, one query per call ({source})",
        [
            "backend",
            "structure",
            "queries",
            "e2e p50 ms",
            "e2e p95 ms",
            "encode ms (p50)",
            "vector search ms (p50)",
            "search + store lookup ms (p50)",
            "cold first query s",
        ],
        rows,
        args.out,
        {"source": source, "args": {k: str(v) for k, v in vars(args).items()}},
    )


if __name__ == "__main__":
    main()
