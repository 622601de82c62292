"""Late-interaction search: the ``plaid`` backend next to brute-force MaxSim (``maxsim``).

    python benchmarks/multivector.py                        # 100,000 x 32 tokens x 128 dims
    python benchmarks/multivector.py --documents 20000 --codecs PQ16,PQ32
    python benchmarks/multivector.py --synthetic            # without the layer feature store
    python benchmarks/multivector.py --cache ~/.cache/mmret/bench   # keep truth and indexes

Documents are token sets drawn like real ones (see ``token_sets.py``: around the starter image
tower's token features from mmret's layer feature store, or a synthetic clustered stand-in
when the store is absent). Timed side by side in one run, medians over ``--repeats`` rounds:

* per-query latency, one query at a time and in one batch of all queries, of plaid with its
  exact re-scoring (stage 4: the best ``refine * k`` documents' full-precision vectors read
  from an SQLite item store, as the engine does) and without it;
* recall@10 against exact MaxSim (``maxsim``'s answers), over ``--recall-queries`` queries;
* bytes per token and per document of plaid's structure (codes, centroid ids, inverted
  lists) and of its cache on disk, and build time;
* a parameter sweep (probes, candidates, rescore, refine) on the built index;
* a codec table (``--codecs``): the recall/size trade-off the default codec was chosen by,
  each codec trained on the residuals from the same centroids as the default;
* the real Flickr8k collection when its token features are stored: the 6,000 training images
  (49 tokens each, projected to the same 128 dimensions, no noise added) searched with
  development-set images (the 1,000 images of the dev store).

Runs on one thread (``OMP_NUM_THREADS=1``) so that ratios hold on a shared machine. With
``--cache DIR`` the item stores, exact answers and built indexes are kept there and reused
(build times are those measured when they were built).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
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
from mmret.index.plaid import PlaidIndex
from mmret.index.plaid_codebook import Codebook, new_codec, resolved_codec
from mmret.index.store import ItemStore, StoredItem

TOKEN_DIM = 128
K = 10
_STORE_CHUNK = 2048  # documents written to the item store per transaction


def recall(found: np.ndarray, expected: np.ndarray) -> float:
    pairs = zip(found, expected, strict=True)
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in pairs]))


def one_by_one(index: VectorIndex, queries: np.ndarray) -> Callable[[], object]:
    return lambda: [index.search(queries[i : i + 1], K) for i in range(len(queries))]


@contextlib.contextmanager
def refining(index: PlaidIndex, refine: int) -> Iterator[None]:
    """``index`` with ``refine`` set for a while (0: without exact re-scoring)."""
    saved, index.refine = index.refine, refine
    try:
        yield
    finally:
        index.refine = saved


def without_refine(index: PlaidIndex, run: Callable[[], object]) -> Callable[[], object]:
    def unrefined() -> object:
        with refining(index, 0):
            return run()

    return unrefined


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


def item_store(folder: Path, vectors: np.ndarray) -> tuple[ItemStore, np.ndarray]:
    """An SQLite item store holding ``vectors`` (made in ``folder`` unless there already),
    opened read-only as a searching engine has it, and its ``(N,)`` keys."""
    path = folder / "items.sqlite"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / "items.partial.sqlite"
        partial.unlink(missing_ok=True)
        store = ItemStore(partial, vectors.shape[1], create=True)
        for start in range(0, len(vectors), _STORE_CHUNK):
            block = vectors[start : start + _STORE_CHUNK]
            store.add([StoredItem(f"doc-{start + i}") for i in range(len(block))], block)
        store.close()
        partial.rename(path)
    store = ItemStore(path, vectors.shape[1], readonly=True)
    keys = np.arange(1, len(vectors) + 1, dtype=np.int64)  # a new store's keys: 1, 2, ...
    first_and_last = store.vectors_at(keys[[0, -1]])  # fails if the store holds other keys
    assert np.array_equal(first_and_last, vectors[[0, -1]]), "the store holds other documents"
    return store, keys


def exact_answers(folder: Path, exact: MaxSimIndex, queries: np.ndarray) -> np.ndarray:
    """``(Q, K)`` keys of exact MaxSim's answers (kept in ``folder``)."""
    path = folder / f"truth-{len(queries)}.npy"
    if path.exists():
        return np.load(path)
    truth = exact.search(queries, K)[1]
    np.save(path, truth)
    return truth


def build_plaid(
    folder: Path, keys: np.ndarray, vectors: np.ndarray, **options: Any
) -> tuple[PlaidIndex, float]:
    """plaid over ``vectors`` and its build time, loaded from ``folder`` when built before."""
    index = PlaidIndex(vectors.shape[1], token_dim=TOKEN_DIM, exact_below=0, **options)
    built = folder / f"plaid-{options.get('codec', 'auto')}-{options.get('centroids', 0)}"
    record = built / "build.json"
    if record.exists() and index.load(built, "benchmark") is not None:
        return index, float(json.loads(record.read_text())["build_seconds"])
    start = time.perf_counter()
    index.add(keys, vectors)
    index._trained.lists()  # type: ignore[union-attr]  # built on first search otherwise
    seconds = time.perf_counter() - start
    built.mkdir(parents=True, exist_ok=True)
    index.save(built, "benchmark", 1)
    record.write_text(json.dumps({"build_seconds": seconds}))
    return index, seconds


def compare(
    name: str,
    folder: Path,
    vectors: np.ndarray,
    queries: np.ndarray,
    timed_queries: int,
    repeats: int,
    options: dict[str, Any],
) -> tuple[list[list[Any]], dict[str, Any], PlaidIndex, np.ndarray]:
    """Rows of the main table for one collection: exact MaxSim and plaid (with and without
    its exact re-scoring), side by side."""
    store, keys = item_store(folder, vectors)
    start = time.perf_counter()
    exact = MaxSimIndex(vectors.shape[1], token_dim=TOKEN_DIM)
    exact.add(keys, vectors)
    exact_build = time.perf_counter() - start
    CONSOLE.print(f"{name}: exact answers for {len(queries)} queries...", style="dim")
    truth = exact_answers(folder, exact, queries)
    plaid, plaid_build = build_plaid(folder, keys, exact.stored_vectors(), **options)
    plaid.use_stored_vectors(store.vectors_at)
    CONSOLE.print(f"{name}: plaid built in {plaid_build:.1f} s; timing...", style="dim")
    sweep = parameter_sweep(plaid, queries, truth)
    found = plaid.search(queries, K)[1]
    with refining(plaid, 0):
        found_unrefined = plaid.search(queries, K)[1]
    timed = queries[:timed_queries]
    times = interleaved_medians(
        {
            "exact single": one_by_one(exact, timed),
            "plaid single": one_by_one(plaid, timed),
            "plaid unrefined single": without_refine(plaid, one_by_one(plaid, timed)),
            "exact batch": lambda: exact.search(timed, K),
            "plaid batch": lambda: plaid.search(timed, K),
            "plaid unrefined batch": without_refine(plaid, lambda: plaid.search(timed, K)),
        },
        repeats,
    )
    per_query = {label: 1000 * seconds / len(timed) for label, seconds in times.items()}
    sizes = structure_bytes(plaid)
    exact_doc = vectors.shape[1] * 4 + 8
    codec = f"{resolved_codec(plaid.codec, TOKEN_DIM)} K={plaid.centroid_count}"
    rows = [
        [name, "maxsim (brute force)", len(vectors), per_query["exact single"],
         per_query["exact batch"], 1.0, 1.0, TOKEN_DIM * 4, exact_doc, exact_build],
        [name, f"plaid {codec} refine={plaid.refine}", len(vectors),
         per_query["plaid single"], per_query["plaid batch"],
         per_query["exact single"] / per_query["plaid single"], recall(found, truth),
         sizes["per_token"], sizes["per_document"], plaid_build],
        [name, f"plaid {codec} refine=0", len(vectors),
         per_query["plaid unrefined single"], per_query["plaid unrefined batch"],
         per_query["exact single"] / per_query["plaid unrefined single"],
         recall(found_unrefined, truth), sizes["per_token"], sizes["per_document"], plaid_build],
    ]  # fmt: skip
    extra = {
        "sweep": {"columns": SWEEP_COLUMNS, "rows": sweep},
        "disk_bytes_per_document": disk_bytes(plaid, len(vectors)),
        "store_bytes_read_per_query": plaid.refine * K * vectors.shape[1] * 4,
        "options": plaid.config(),
        "ms_per_query": per_query,
    }
    return rows, extra, plaid, truth


#: (probes, candidates, rescore, refine) tried on one built index: the defaults were chosen here.
SWEEP = (
    (2, 512, 128, 0), (4, 512, 128, 0), (4, 1024, 256, 0), (4, 2048, 512, 0), (8, 2048, 512, 0),
    (4, 1024, 256, 1), (4, 1024, 256, 2), (4, 1024, 256, 4), (4, 1024, 256, 8),
    (2, 512, 128, 4), (4, 512, 128, 4), (4, 1024, 128, 4), (2, 1024, 256, 4), (4, 1024, 512, 4),
    (4, 1536, 384, 4), (2, 2048, 512, 4), (4, 2048, 512, 4), (8, 2048, 512, 4),
)  # fmt: skip
SWEEP_COLUMNS = ["probes", "candidates", "rescore", "refine", "recall@10", "ms/query", "KB read"]


def parameter_sweep(plaid: PlaidIndex, queries: np.ndarray, truth: np.ndarray) -> list[list[Any]]:
    """Recall@10, batched latency and bytes read from the store of :data:`SWEEP`'s settings."""
    chosen = (plaid.probes, plaid.candidates, plaid.rescore, plaid.refine)
    rows = []
    for plaid.probes, plaid.candidates, plaid.rescore, plaid.refine in SWEEP:
        start = time.perf_counter()
        found = plaid.search(queries, K)[1]
        latency = 1000 * (time.perf_counter() - start) / len(queries)
        read_kb = plaid.refine * K * plaid.dim * 4 / 1024
        settings = [plaid.probes, plaid.candidates, plaid.rescore, plaid.refine]
        rows.append([*settings, recall(found, truth), latency, read_kb])
    plaid.probes, plaid.candidates, plaid.rescore, plaid.refine = chosen
    return rows


def with_codec(base: PlaidIndex, vectors: np.ndarray, codec: str) -> tuple[PlaidIndex, float]:
    """A plaid index like ``base`` (same centroids, same search options) whose residuals are
    coded by ``codec`` instead, and its codec's training and encoding time."""
    trained_base = base._trained
    assert trained_base is not None
    index = PlaidIndex(base.dim, token_dim=TOKEN_DIM, exact_below=0, codec=codec)
    index.probes, index.candidates, index.rescore = base.probes, base.candidates, base.rescore
    index.refine = base.refine
    if base._stored is not None:
        index.use_stored_vectors(base._stored)
    start = time.perf_counter()
    trained = Codebook(trained_base.centroids, new_codec(codec, TOKEN_DIM))
    rng = np.random.default_rng(0)
    sample = vectors[rng.permutation(len(vectors))[:2048]].reshape(-1, TOKEN_DIM)
    trained.codec.train(sample - trained.centroids[trained.assign(sample)])
    trained.add(trained_base.keys.view, vectors)
    trained.lists()
    index._trained = trained
    return index, time.perf_counter() - start


def codec_table(
    base: PlaidIndex, vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray, codecs: list[str]
) -> list[list[Any]]:
    """Per codec: bytes a token, recall@10 with and without exact re-scoring, ms/query, and
    the codec's build time (training and encoding; the centroids are shared)."""
    rows = []
    for codec in codecs:
        plaid, build = with_codec(base, vectors, codec)
        start = time.perf_counter()
        found = plaid.search(queries, K)[1]
        latency = 1000 * (time.perf_counter() - start) / len(queries)
        with refining(plaid, 0):
            unrefined = plaid.search(queries, K)[1]
        sizes = structure_bytes(plaid)
        rows.append([codec, sizes["per_token"], recall(unrefined, truth), recall(found, truth),
                     latency, build])  # fmt: skip
        CONSOLE.print(f"codec {codec}: recall {rows[-1][2]:.3f} / {rows[-1][3]:.3f}", style="dim")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--documents", type=int, default=100_000)
    parser.add_argument("--tokens", type=int, default=32, help="tokens per document and query")
    parser.add_argument("--recall-queries", type=int, default=100)
    parser.add_argument("--timed-queries", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--codecs",
        default="OPQ32_128,PQ32x10;PQ64x5;PQ32;PQ16",
        help="codecs to compare with the default, ';' between them ('' for none)",
    )
    parser.add_argument("--synthetic", action="store_true", help="skip the layer store")
    parser.add_argument("--probes", type=int, default=None)
    parser.add_argument("--candidates", type=int, default=None)
    parser.add_argument("--rescore", type=int, default=None)
    parser.add_argument("--refine", type=int, default=None)
    parser.add_argument("--codec", default=None, help="plaid's codec in the main table")
    parser.add_argument("--cache", type=Path, default=None, help="keep stores and indexes here")
    parser.add_argument("--no-flickr", action="store_true", help="skip the Flickr8k rows")
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
        for name in ("probes", "candidates", "rescore", "refine", "codec")
        if (value := getattr(args, name)) is not None
    }
    with contextlib.ExitStack() as stack:
        cache = args.cache or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        run(args, options, cache.expanduser())


def run(args: argparse.Namespace, options: dict[str, Any], cache: Path) -> None:
    pool = token_sets.sources(TOKEN_DIM, synthetic=args.synthetic)
    groups = token_sets.topics(pool)
    CONSOLE.print(f"token sources: {pool.origin}", style="dim")
    vectors = token_sets.draw(pool, groups, args.documents, args.tokens, seed=1)
    queries = token_sets.draw(pool, groups, args.recall_queries, args.tokens, seed=2)
    label = "real-token" if pool.origin.startswith("real") else "synthetic"
    name = f"{label} {args.documents // 1000}k"
    folder = cache / f"{label}-{args.documents}x{args.tokens}"
    rows, extra, plaid, truth = compare(
        name, folder, vectors, queries, args.timed_queries, args.repeats, options
    )
    results: dict[str, Any] = {"sources": pool.origin, str(args.documents): extra}

    codecs = [codec for codec in args.codecs.split(";") if codec]
    if codecs:
        default = rows[1]  # the main table's plaid, not built again
        table = [[resolved_codec(plaid.codec, TOKEN_DIM), default[7], rows[2][6], default[6],
                  default[4], default[9]]]  # fmt: skip
        table += codec_table(plaid, vectors, queries, truth, codecs)
        report(
            f"Residual codecs at {args.documents:,} documents (same centroids, default search)",
            ["codec", "bytes/token", "recall@10 refine=0", f"recall@10 refine={plaid.refine}",
             "ms/query (batch)", "build s"],
            table,
            RESULTS / "multivector_codecs.json",
            {"sources": pool.origin},
        )  # fmt: skip
    del plaid, vectors

    flickr = None if args.quick or args.no_flickr else token_sets.flickr_collection(TOKEN_DIM)
    if flickr is not None:
        documents, flickr_queries, origin = flickr
        flickr_rows, flickr_extra, _, _ = compare(
            "Flickr8k images", cache / "flickr8k", documents,
            flickr_queries[: args.recall_queries], args.timed_queries, args.repeats, options,
        )  # fmt: skip
        rows += flickr_rows
        results["flickr8k"] = {"origin": origin, **flickr_extra}

    for collection, details in results.items():
        if isinstance(details, dict) and "sweep" in details:
            CONSOLE.print(
                f"parameter sweep, {collection}: probes/candidates/rescore/refine -> "
                "recall@10, ms/query (batch), KB read from the store per query"
            )
            for row in details["sweep"]["rows"]:
                settings = "/".join(str(value) for value in row[:4])
                CONSOLE.print(f"  {settings}: {row[4]:.3f}, {row[5]:.1f}, {row[6]:.0f}")
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
