"""Peak memory of search with and without reranking over an index with stored token features.

    python benchmarks/rerank_memory.py [--items 100000] [--folder DIR] [--rerank 20,100]

Builds (once; reused when ``--folder`` already holds it) an index of ``--items`` items, each
with an image and a caption, whose token features are stored beside it exactly as
``mmret index --token-features`` stores them for the shipped reranker: a 4x4 grid of 1,280-d
image tokens and ~14 text tokens of 384, float16. The features are synthetic (random, with
the real shapes) so that building 100,000 items takes minutes, not the hours the towers would;
the vectors are ``hash:512``'s. Then each measurement runs in a fresh process: open the index,
run the queries (text queries, k = 10) without reranking or with ``--rerank N``, and report
the process's peak resident memory (``VmHWM``) and the median latency. The difference between
the two peaks is what reranking costs in memory: the reranker's weights, the candidates'
features read just in time from the memory-mapped files, and the cross-encoder's activations.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from _common import RESULTS, folder_bytes, report, rss_bytes
from mmret import Item, Retriever
from mmret.encoders.hashing import HashEncoder
from mmret.heads.cross_encoder import CrossEncoder, RerankConfig
from mmret.layers import LayerFeatures
from mmret.reranker import SHIPPED_RERANKER, Reranker, load_reranker

TOWERS = "efficientnet-lite0+all-MiniLM-L6-v2"
CHUNK = 2000
QUERIES = ["a dog runs on the beach", "two children play in the snow", "a man rides a bike"]


class SyntheticLayers(HashEncoder):
    """``hash:512`` vectors plus random layer features of the starter towers' shapes: image
    layer 8 as a 4x4 map of 1,280 channels, text layer 6 as 14 tokens of 384."""

    image_size = 8

    @property
    def layer_source(self) -> str:
        return TOWERS

    @property
    def image_layer_count(self) -> int:
        return 8

    @property
    def text_layer_count(self) -> int:
        return 6

    # Drawn once: what the features hold does not change what reading them costs.
    _image = torch.randn(CHUNK, 16, 1280)
    _text = torch.randn(CHUNK, 14, 384)

    def _image_layers(self, images: list[Image.Image], layers: tuple[int, ...]) -> LayerFeatures:
        tokens = self._image[: len(images)]
        return LayerFeatures(layers, (tokens,), (torch.ones(len(images), 16, dtype=torch.bool),))

    def _text_layers(self, texts: list[str], layers: tuple[int, ...]) -> LayerFeatures:
        tokens = self._text[: len(texts)]
        return LayerFeatures(layers, (tokens,), (torch.ones(len(texts), 14, dtype=torch.bool),))


def reranker(folder: str) -> Reranker:
    if folder or (SHIPPED_RERANKER / "config.json").is_file():
        return load_reranker(folder or None, SyntheticLayers(512))
    config = RerankConfig("starter", TOWERS, 8, 6, 1280, 384)  # untrained: same memory
    return Reranker(CrossEncoder(config).eval(), SyntheticLayers(512))


def build(folder: Path, items: int, model: str) -> float:
    started = time.perf_counter()
    png = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 120, 200)).save(png, format="PNG")
    encoder = SyntheticLayers(512)
    spec = reranker(model).spec
    rng = np.random.default_rng(0)
    # exact: "auto" would build an HNSW graph at 100,000 items, in every measuring process.
    with Retriever.create(folder, encoder=encoder, backend="exact", token_features=spec) as index:
        for start in range(0, items, CHUNK):
            batch = [
                Item(f"item-{i}", text=f"photo {i}", image=png.getvalue())
                for i in range(start, min(start + CHUNK, items))
            ]
            index.add_vectors(batch, rng.standard_normal((len(batch), 512)).astype(np.float32))
            print(f"built {start + len(batch)} items", file=sys.stderr, flush=True)
    return time.perf_counter() - started


def measure(folder: Path, rerank: int, model: str, repeats: int) -> dict[str, Any]:
    """In this (fresh) process: open, search, and report the peak memory and latency."""
    torch.set_num_threads(1)
    encoder = SyntheticLayers(512)
    chosen = reranker(model) if rerank else None
    times = []
    with Retriever.open(folder, encoder=encoder, readonly=True) as index:
        for _ in range(repeats):
            for query in QUERIES:
                began = time.perf_counter()
                index.search([query], k=10, rerank=rerank, reranker=chosen)
                times.append(time.perf_counter() - began)
    return {"peak_rss": rss_bytes("VmHWM"), "ms": 1000 * statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/mmret-rerank-100k"))
    parser.add_argument("--rerank", default="20,100")
    parser.add_argument("--reranker", default="", help="reranker folder (default: shipped)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--measure", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "rerank_memory.json")
    args = parser.parse_args()
    if args.measure >= 0:
        print(json.dumps(measure(args.folder, args.measure, args.reranker, args.repeats)))
        return
    built = 0.0
    if not (args.folder / "manifest.json").is_file():
        built = build(args.folder, args.items, args.reranker)
    rows, results = [], {}
    for rerank in [0, *(int(n) for n in args.rerank.split(","))]:
        command = [sys.executable, __file__, "--folder", str(args.folder), "--measure"]
        command += [str(rerank), "--reranker", args.reranker, "--repeats", str(args.repeats)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[rerank] = json.loads(output.strip().splitlines()[-1])
    base = results[0]["peak_rss"]
    for rerank, result in results.items():
        extra_mb = (result["peak_rss"] - base) / 2**20
        label = "search" if rerank == 0 else f"search + rerank top {rerank}"
        rows.append([label, result["peak_rss"] / 2**20, extra_mb, result["ms"]])
    size = folder_bytes(args.folder) / 2**30
    report(
        f"Peak memory over {args.items:,} items with stored token features ({size:.1f} GiB)",
        ["", "peak RSS (MB)", "above search (MB)", "median ms/query"],
        rows,
        args.out,
        {"items": args.items, "index_gib": round(size, 2), "build_seconds": round(built, 1)},
    )


if __name__ == "__main__":
    main()
