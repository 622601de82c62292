"""What a RECO memory costs: extra milliseconds per query, and its size on disk and in memory.

Refining one embedding = a k-nearest-neighbour search in the memory (through mmret's index,
with the SQLite lookup of the hits) + gathering the k partners + the fusion. The script times
``Refiner.refine`` on single text and image queries and on batches of 256 (per query), for the
mean and the trained transformer fusion at k = 5, 10, 20, on synthetic memories of the given
sizes (512-d unit vectors, the starter model's space) and, with ``--memory DIR``, on a real one.
Footprint: the memory folder on disk, and the resident memory that opening it and searching it
adds (the exact backend keeps both towers' vectors in RAM).

    python benchmarks/reco_latency.py --memory runs/memory-flickr8k-train
"""

from __future__ import annotations

import argparse
import gc
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from _common import (
    RESULTS,
    folder_bytes,
    interleaved_medians,
    parse_sizes,
    report,
    rss_bytes,
    unit_rows,
)
from mmret.encoders import load_encoder
from mmret.items import Item
from mmret.memory.refine import load_refiner
from mmret.memory.store import Memory, write_memory

KS = (5, 10, 20)


def synthetic_memory(folder: Path, pairs: int) -> Path:
    """Pairs of 512-d unit vectors (a text is a noisy copy of its image) in the starter's
    space: what the latency depends on is the count and the dimension, not the content."""
    image = unit_rows(pairs, 512, seed=0)
    noisy = image + 0.05 * unit_rows(pairs, 512, seed=1)
    text = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    items = [Item(id=f"pair-{i}", text="synthetic") for i in range(pairs)]
    write_memory(
        folder, load_encoder("starter"), items, {"image": image, "text": text}, source="synthetic"
    )
    return folder


def measure(folder: Path, label: str, repeats: int) -> list[list[Any]]:
    gc.collect()
    before = rss_bytes("VmRSS")
    memory = Memory.open(folder)
    queries = unit_rows(256, memory.manifest.dim, seed=7)
    memory.neighbours(queries[:1], "text", 5)  # backends are built on first search
    resident = rss_bytes("VmRSS") - before
    rows = []
    for fusion in ("mean", "transformer"):
        for k in KS:
            refiner = load_refiner(memory, fusion, k=k)
            runs = {
                "text": lambda r=refiner: r.refine(queries[:1], "text"),
                "image": lambda r=refiner: r.refine(queries[:1], "image"),
                "batch": lambda r=refiner: r.refine(queries, "text"),
            }
            times = interleaved_medians(runs, repeats)
            rows.append(
                [
                    label,
                    len(memory),
                    fusion,
                    k,
                    1000 * times["text"],
                    1000 * times["image"],
                    1000 * times["batch"] / len(queries),
                    folder_bytes(folder) / 2**20,
                    resident / 2**20,
                ]
            )
    memory.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="6000,60000", help="synthetic memory sizes (pairs)")
    parser.add_argument("--memory", type=Path, help="also measure this memory folder")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--out", type=Path, default=RESULTS / "reco_latency.json")
    args = parser.parse_args()
    sizes = [500] if args.quick else parse_sizes(args.sizes)
    repeats = 3 if args.quick else args.repeats
    rows: list[list[Any]] = []
    with tempfile.TemporaryDirectory(prefix="mmret-reco-bench-") as scratch:
        for size in sizes:
            folder = synthetic_memory(Path(scratch) / f"memory-{size}", size)
            rows += measure(folder, "synthetic", repeats)
    if args.memory is not None:
        rows += measure(args.memory, args.memory.name, repeats)
    columns = [
        "memory",
        "pairs",
        "fusion",
        "k",
        "ms/text query",
        "ms/image query",
        "ms/query (batch 256)",
        "disk MiB",
        "RAM MiB (open)",
    ]
    report(
        "Extra cost of refining with a RECO memory (per query)",
        columns,
        rows,
        args.out,
        {"repeats": repeats},
    )


if __name__ == "__main__":
    main()
