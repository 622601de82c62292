"""Residual codecs for plaid within 48 bytes a token: reconstruction error and encoding speed.

    python benchmarks/residual_codecs.py                       # PQ, OPQ, RQ and PRQ
    python benchmarks/residual_codecs.py --codecs "PQ32x10;LSQ40x8"

The codecs ``benchmarks/multivector.py`` cannot afford to build at 100,000 documents (3.2
million tokens) on one thread are measured here on a sample: each FAISS codec is trained on
the residuals of 12,288 real-like tokens (``token_sets.py``) from 256 spherical k-means
centroids, then encodes 1,024 others. Reported: code bytes, training seconds, encoding speed
and the time it projects for 3.2 million tokens, and the relative squared reconstruction
error (lower is better).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy and FAISS start their pools
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import faiss
import numpy as np

import token_sets
from _common import CONSOLE, RESULTS, report
from mmret.index.plaid_codebook import new_codec

TOKEN_DIM = 128
TRAIN, TEST = 12_288, 1_024
PROJECTED_TOKENS = 3_200_000  # 100,000 documents of 32 tokens


def residuals() -> np.ndarray:
    """``(TRAIN + TEST, TOKEN_DIM)`` residuals of real-like tokens from their centroid."""
    pool = token_sets.sources(TOKEN_DIM)
    tokens = token_sets.draw(pool, token_sets.topics(pool), 512, 32, seed=5)
    tokens = tokens.reshape(-1, TOKEN_DIM)[: TRAIN + TEST]
    kmeans = faiss.Kmeans(TOKEN_DIM, 256, niter=10, spherical=True, seed=1)
    kmeans.train(tokens)
    _, nearest = kmeans.index.search(tokens, 1)
    return np.ascontiguousarray(tokens - kmeans.centroids[nearest[:, 0]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--codecs", default="PQ32x10;OPQ32_128,PQ32x10;PQ64x5;RQ40x8;PRQ8x5x8")
    args = parser.parse_args()
    faiss.omp_set_num_threads(1)
    data = residuals()
    train, test = data[:TRAIN], data[TRAIN:]
    rows = []
    for codec in args.codecs.split(";"):
        made = new_codec(codec, TOKEN_DIM)
        start = time.perf_counter()
        made.train(train)
        trained = time.perf_counter() - start
        start = time.perf_counter()
        codes = made.sa_encode(test)
        per_token = (time.perf_counter() - start) / len(test)
        error = ((made.sa_decode(codes) - test) ** 2).sum(1).mean() / (test**2).sum(1).mean()
        rows.append([codec, int(made.sa_code_size()), trained, 1 / per_token,
                     PROJECTED_TOKENS * per_token / 60, float(error)])  # fmt: skip
        CONSOLE.print(f"{codec}: error {error:.4f}", style="dim")
    report(
        f"Residual codecs: trained on {TRAIN:,} residuals, encoding {TEST:,}, one thread",
        ["codec", "bytes/token", "train s", "tokens/s encoded", "min for 3.2M tokens",
         "relative error"],
        rows,
        RESULTS / "residual_codecs.json",
        {},
    )  # fmt: skip


if __name__ == "__main__":
    main()
