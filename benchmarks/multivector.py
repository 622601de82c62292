"""Late-interaction search: the ``plaid`` backend next to brute-force MaxSim (``maxsim``).

    python benchmarks/multivector.py                        # 100,000 x 32 tokens x 128 dims
    python benchmarks/multivector.py --documents 20000 --codecs PQ16,PQ32
    python benchmarks/multivector.py --synthetic            # without the layer feature store

Documents are token sets drawn like real ones (see ``token_sets.py``: around the starter image
tower's token features from mmret's layer feature store, or a synthetic clustered stand-in
when the store is absent). Timed side by side in one run, medians over ``--repeats`` rounds:

* per-query latency, one query at a time and in one batch of all queries;
* recall@10 against exact MaxSim (``maxsim``'s answers), over ``--recall-queries`` queries;
* bytes per token and per document of plaid's structure (codes, centroid ids, inverted
  lists) and of its cache on disk, and build time;
* a codec table (``--codecs``): the recall/size trade-off the default codec was chosen by;
* the real Flickr8k collection when its token features are stored: the 6,000 training images
  (49 tokens each, projected to the same 128 dimensions, no noise added) searched with
  development-set images (the 1,000 images of the dev store).

Runs on one thread (``OMP_NUM_THREADS=1``) so that ratios hold on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy and FAISS start their pools
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
import torch

import token_sets
from _common import CONSOLE, RESULTS, folder_bytes, interleaved_medians, report
from mmret.index.base import VectorIndex
from mmret.index.maxsim import MaxSimIndex
from mmret.index.plaid import PlaidIndex, resolved_codec

TOKEN_DIM = 128
K = 10


def recall(found: np.ndarray, expected: np.ndarray) -> float:
    pairs = zip(found, expected, strict=True)
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in pairs]))


def one_by_one(index: VectorIndex, queries: np.ndarray) -> Callable[[], object]:
    return lambda: [index.search(queries[i : i + 1], K) for i in range(len(queries))]


def structure_bytes(index: PlaidIndex) -> dict[str, float]:
    """Bytes of plaid's per-document structure: codes, centroid ids, inverted-list entries."""
    trained = index._trained
    assert trained is not None
    docs, tokens = trained.cids.view.shape
    _offsets, rows = trained.lists()
    per_token = trained.code_size + 2 + 4 * len(rows) / (docs * tokens)
    return {"per_token": per_token, "per_document": per_token * tokens + 9}  # + key, alive


def disk_bytes(index: PlaidIndex, documents: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        index.save(Path(folder), "benchmark", 1)
        return folder_bytes(Path(folder)) / documents


def build_plaid(keys: np.ndarray, vectors: np.ndarray, **options: Any) -> tuple[PlaidIndex, float]:
    index = PlaidIndex(vectors.shape[1], token_dim=TOKEN_DIM, exact_below=0, **options)
    start = time.perf_counter()
    index.add(keys, vectors)
    index._trained.lists()  # type: ignore[union-attr]  # built on first search otherwise
    return index, time.perf_counter() - start


def compare(
    name: str,
    vectors: np.ndarray,
    queries: np.ndarray,
    timed_queries: int,
    repeats: int,
    options: dict[str, Any],
) -> tuple[list[list[Any]], dict[str, Any], np.ndarray]:
    """Rows of the main table for one collection: exact MaxSim and plaid, side by side."""
    keys = np.arange(len(vectors), dtype=np.int64)
    start = time.perf_counter()
    exact = MaxSimIndex(vectors.shape[1], token_dim=TOKEN_DIM)
    exact.add(keys, vectors)
    exact_build = time.perf_counter() - start
    CONSOLE.print(f"{name}: exact answers for {len(queries)} queries...", style="dim")
    truth = exact.search(queries, K)[1]
    plaid, plaid_build = build_plaid(keys, exact.stored_vectors(), **options)
    CONSOLE.print(f"{name}: plaid built in {plaid_build:.1f} s; timing...", style="dim")
    sweep = parameter_sweep(plaid, queries, truth)
    found = plaid.search(queries, K)[1]
    timed = queries[:timed_queries]
    times = interleaved_medians(
        {
            "exact single": one_by_one(exact, timed),
            "plaid single": one_by_one(plaid, timed),
            "exact batch": lambda: exact.search(timed, K),
            "plaid batch": lambda: plaid.search(timed, K),
        },
        repeats,
    )
    per_query = {label: 1000 * seconds / len(timed) for label, seconds in times.items()}
    sizes = structure_bytes(plaid)
    exact_doc = vectors.shape[1] * 4 + 8
    rows = [
        [name, "maxsim (brute force)", len(vectors), per_query["exact single"],
         per_query["exact batch"], 1.0, 1.0, TOKEN_DIM * 4, exact_doc, exact_build],
        [name, f"plaid {resolved_codec(plaid.codec, TOKEN_DIM)} K={plaid.centroid_count}",
         len(vectors),
         per_query["plaid single"], per_query["plaid batch"],
         per_query["exact single"] / per_query["plaid single"], recall(found, truth),
         sizes["per_token"], sizes["per_document"], plaid_build],
    ]  # fmt: skip
    extra = {
        "sweep": {
            "columns": ["probes", "candidates", "rescore", "recall@10", "ms/query"],
            "rows": sweep,
        },
        "disk_bytes_per_document": disk_bytes(plaid, len(vectors)),
        "options": plaid.config(),
        "ms_per_query": per_query,
    }
    return rows, extra, truth


#: (probes, candidates, rescore) tried on one built index: the defaults were chosen here.
SWEEP = ((2, 512, 128), (4, 512, 128), (4, 1024, 256), (4, 2048, 512), (8, 2048, 512))


def parameter_sweep(plaid: PlaidIndex, queries: np.ndarray, truth: np.ndarray) -> list[list[Any]]:
    """Recall@10 and batched latency of the search parameters in :data:`SWEEP`."""
    chosen = (plaid.probes, plaid.candidates, plaid.rescore)
    rows = []
    for plaid.probes, plaid.candidates, plaid.rescore in SWEEP:
        start = time.perf_counter()
        found = plaid.search(queries, K)[1]
        latency = 1000 * (time.perf_counter() - start) / len(queries)
        rows.append([plaid.probes, plaid.candidates, plaid.rescore, recall(found, truth), latency])
    plaid.probes, plaid.candidates, plaid.rescore = chosen
    return rows


def codec_table(
    vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray, codecs: list[str]
) -> list[list[Any]]:
    keys = np.arange(len(vectors), dtype=np.int64)
    rows = []
    for codec in codecs:
        plaid, build = build_plaid(keys, vectors, codec=codec)
        start = time.perf_counter()
        found = plaid.search(queries, K)[1]
        latency = 1000 * (time.perf_counter() - start) / len(queries)
        sizes = structure_bytes(plaid)
        rows.append([codec, sizes["per_token"], recall(found, truth), latency, build])
        CONSOLE.print(f"codec {codec}: recall {rows[-1][2]:.3f}", style="dim")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--documents", type=int, default=100_000)
    parser.add_argument("--tokens", type=int, default=32, help="tokens per document and query")
    parser.add_argument("--recall-queries", type=int, default=100)
    parser.add_argument("--timed-queries", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--codecs", default="PQ16,PQ32", help="codecs to compare with the default ('' for none)"
    )
    parser.add_argument("--synthetic", action="store_true", help="skip the layer store")
    parser.add_argument("--probes", type=int, default=None)
    parser.add_argument("--candidates", type=int, default=None)
    parser.add_argument("--rescore", type=int, default=None)
    parser.add_argument("--codec", default=None, help="plaid's codec in the main table")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run (1,500 documents; its own JSON file)"
    )
    args = parser.parse_args()
    if args.quick:
        args.documents, args.recall_queries, args.timed_queries = 1500, 10, 3
        args.repeats, args.codecs = 1, ""
    torch.set_num_threads(1)
    options = {
        name: value
        for name in ("probes", "candidates", "rescore", "codec")
        if (value := getattr(args, name)) is not None
    }

    pool = token_sets.sources(TOKEN_DIM, synthetic=args.synthetic)
    groups = token_sets.topics(pool)
    CONSOLE.print(f"token sources: {pool.origin}", style="dim")
    vectors = token_sets.draw(pool, groups, args.documents, args.tokens, seed=1)
    queries = token_sets.draw(pool, groups, args.recall_queries, args.tokens, seed=2)
    label = "real-token" if pool.origin.startswith("real") else "synthetic"
    rows, extra, truth = compare(
        f"{label} {args.documents // 1000}k", vectors, queries, args.timed_queries,
        args.repeats, options,
    )  # fmt: skip
    results: dict[str, Any] = {"sources": pool.origin, str(args.documents): extra}

    flickr = None if args.quick else token_sets.flickr_collection(TOKEN_DIM)
    if flickr is not None:
        documents, flickr_queries, origin = flickr
        flickr_rows, flickr_extra, _ = compare(
            "Flickr8k images", documents, flickr_queries[: args.recall_queries],
            args.timed_queries, args.repeats, options,
        )  # fmt: skip
        rows += flickr_rows
        results["flickr8k"] = {"origin": origin, **flickr_extra}

    codecs = [codec for codec in args.codecs.split(",") if codec]
    if codecs:
        default = rows[1]  # the main table's plaid, not built again
        name = resolved_codec(extra["options"]["codec"], TOKEN_DIM)
        table = [[name, default[7], default[6], default[4], default[9]]]
        table += codec_table(vectors, queries, truth, codecs)
        report(
            f"Residual codecs at {args.documents:,} documents (default probes, candidates)",
            ["codec", "bytes/token", "recall@10", "ms/query (batch)", "build s"],
            table,
            RESULTS / "multivector_codecs.json",
            {"sources": pool.origin},
        )

    for collection, details in results.items():
        if isinstance(details, dict) and "sweep" in details:
            CONSOLE.print(
                f"parameter sweep, {collection}: probes/candidates/rescore -> recall@10, "
                "ms/query (batch)"
            )
            for row in details["sweep"]["rows"]:
                CONSOLE.print(f"  {row[0]}/{row[1]}/{row[2]}: {row[3]:.3f}, {row[4]:.1f}")
    report(
        f"Late interaction: {args.tokens} tokens x {TOKEN_DIM} dims, k={K}, one thread",
        ["collection", "backend", "documents", "ms/query single", "ms/query batched",
         "speedup", "recall@10", "bytes/token", "bytes/doc", "build s"],
        rows,
        RESULTS / ("multivector_quick.json" if args.quick else "multivector.json"),
        results,
    )  # fmt: skip


if __name__ == "__main__":
    main()
