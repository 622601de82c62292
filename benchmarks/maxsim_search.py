"""Exact late-interaction (MaxSim) search per query at 1k, 10k and 100k documents.

    python benchmarks/maxsim_search.py [--sizes 1000,10000,100000] [--shapes 16x64,32x128]

The exact path scores one query's ``T`` tokens against every stored document's tokens with
``mmret.late_interaction.maxsim`` and keeps the 10 best (``np.argpartition``); these are the
numbers a multi-vector index has to beat. Token shapes are ``T x token_dim`` (ReT's shipped
model is 16x64); ``1x512`` is a single-vector model's dot product for scale. Documents and
queries are random unit tokens (the cost does not depend on the values). Each figure is the
median over ``--repeats`` single queries, shapes timed in turns.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from _common import RESULTS, interleaved_medians, parse_sizes, report, unit_rows
from mmret.late_interaction import maxsim


def parse_shape(text: str) -> tuple[int, int]:
    tokens, dim = text.lower().split("x")
    return int(tokens), int(dim)


def top10(query: np.ndarray, documents: np.ndarray, token_dim: int) -> np.ndarray:
    scores = maxsim(query, documents, token_dim)[0]
    best: np.ndarray = np.argpartition(-scores, 10)[:10]
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--shapes", default="16x64,16x128,32x64,32x128,1x512")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "maxsim_search.json")
    parser.add_argument("--quick", action="store_true", help="1k and 2k documents, 2 repeats")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.repeats = "1000,2000", 2
    shapes = [parse_shape(s) for s in args.shapes.split(",")]
    rows, results = [], {}
    for size in parse_sizes(args.sizes):
        runs = {}
        for tokens, dim in shapes:
            documents = unit_rows(size * tokens, dim, seed=1).reshape(size, tokens * dim)
            query = unit_rows(tokens, dim, seed=2).reshape(1, tokens * dim)
            runs[f"{tokens}x{dim}"] = (
                lambda q=query, d=documents, k=dim: top10(q, d, k)  # type: ignore[misc]
            )
        seconds = interleaved_medians(runs, args.repeats)
        for (tokens, dim), name in zip(shapes, runs, strict=True):
            mib = size * tokens * dim * 4 / 2**20
            rows.append([size, name, round(seconds[name] * 1000, 2), round(mib, 1)])
            results[f"{size}/{name}"] = {"ms_per_query": seconds[name] * 1000, "MiB": mib}
        del runs
    columns = ["documents", "tokens x dim", "ms / query", "float32 MiB"]
    report("Exact MaxSim search, one query, top 10", columns, rows, args.out, results)


if __name__ == "__main__":
    main()
