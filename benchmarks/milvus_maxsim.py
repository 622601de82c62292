"""Late interaction on Milvus Lite (``milvus-maxsim``) next to exact MaxSim (``maxsim``).

    python benchmarks/milvus_maxsim.py [--documents 5000] [--tokens 32] [--token-dim 128]
        [--token-k 32,128,512] [--queries 50] [--repeats 3]

Both are real indexes (``Retriever``, items in ``items.sqlite``) of the same token sets, drawn
like real ones (``token_sets.py``: around the starter image tower's token features when the
layer feature store has them, else a synthetic clustered stand-in). ``milvus-maxsim`` keeps
each token as a Milvus Lite row (FLAT), finds each query token's ``token_k`` nearest tokens,
and re-scores their documents by exact MaxSim from the item store; the sweep over
``token_k`` is one index searched with each setting. Query latency is one query at a time,
medians over ``--repeats`` rounds timed in turns; recall@10 is against ``maxsim``'s answers.
One thread (``OMP_NUM_THREADS=1``) so ratios hold on a shared machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from _common import RESULTS, folder_bytes, interleaved_medians, report
from mmret import Item, Retriever
from mmret.encoders.hashing import TokenHashEncoder
from token_sets import draw, sources, topics

BACKENDS = ("maxsim", "milvus")


def build(folder: Path, backend: str, encoder: TokenHashEncoder, documents: np.ndarray) -> float:
    """Seconds to create the index and add ``documents`` (through the engine's add path)."""
    start = time.perf_counter()
    with Retriever.create(folder, encoder=encoder, backend=backend) as retriever:
        for first in range(0, len(documents), 1024):
            rows = documents[first : first + 1024]
            items = [Item(f"doc-{first + i}", text="-") for i in range(len(rows))]
            retriever.add_vectors(items, rows)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", type=int, default=5000)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--token-dim", type=int, default=128)
    parser.add_argument("--token-k", default="32,128,512")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--synthetic", action="store_true", help="skip the layer store")
    parser.add_argument("--out", type=Path, default=RESULTS / "milvus_maxsim.json")
    args = parser.parse_args()
    pool = sources(args.token_dim, args.synthetic)
    groups = topics(pool)
    documents = draw(pool, groups, args.documents, args.tokens, seed=1)
    queries = draw(pool, groups, args.queries, args.tokens, seed=2)
    encoder = TokenHashEncoder(args.tokens, args.token_dim)
    scratch = Path(tempfile.mkdtemp(prefix="mmret-milvus-maxsim-"))
    seconds = {
        name: build(scratch / name, name, encoder, documents) for name in ["maxsim", "milvus"]
    }
    exact = Retriever.open(scratch / "maxsim", readonly=True)
    milvus = Retriever.open(scratch / "milvus", readonly=True)
    truth = [[hit.id for hit in row] for row in exact.search_vectors(queries, k=10)]

    def one_at_a_time(retriever: Retriever) -> Callable[[], None]:
        return lambda: [retriever.search_vectors(queries[[i]], k=10) for i in range(len(queries))]

    settings = [int(k) for k in args.token_k.split(",")]
    rows = []
    latency = interleaved_medians({"maxsim": one_at_a_time(exact)}, args.repeats)
    rows.append(["maxsim (exact)", "", seconds["maxsim"], folder_bytes(scratch / "maxsim") / 2**20,
                 1000 * latency["maxsim"] / len(queries), 1.0])  # fmt: skip
    backend = milvus._backend
    for token_k in settings:
        backend.token_k = token_k  # type: ignore[attr-defined]  # the option, swept in place
        found = [[hit.id for hit in row] for row in milvus.search_vectors(queries, k=10)]
        recall = np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)])
        took = interleaved_medians({"milvus": one_at_a_time(milvus)}, args.repeats)["milvus"]
        rows.append(["milvus-maxsim (Lite, FLAT)", token_k, seconds["milvus"],
                     folder_bytes(scratch / "milvus") / 2**20, 1000 * took / len(queries),
                     float(recall)])  # fmt: skip
    exact.close()
    milvus.close()
    report(
        f"{args.documents:,} documents of {args.tokens} x {args.token_dim} tokens ({pool.origin}); "
        f"{args.queries} queries of {args.tokens} tokens, k=10",
        ["backend", "token_k", "build s", "disk MiB", "query ms", "recall@10"],
        rows,
        args.out,
        {"documents": args.documents, "tokens": args.tokens, "token_dim": args.token_dim},
    )


if __name__ == "__main__":
    main()
