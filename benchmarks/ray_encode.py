"""Indexing throughput with Ray workers next to the single-process path, on the same items.

    python benchmarks/ray_encode.py [--images 512] [--workers 1,2] [--repeats 3]
        [--model starter] [--shard-size 256]

Each run builds a fresh index of the first ``--images`` Flickr8k dev rows (image and its five
captions, as ``mmret index`` reads ``dev.jsonl``) with the default starter model:
``single process`` is ``Retriever.create`` + ``add(read_items(...))`` (torch on every core);
``ray, N workers`` is ``Retriever.create`` + ``mmret.add_with_ray`` with N actors of one CPU
each on a local Ray cluster started once beforehand (as a cluster normally already runs), so
each run includes the actors' start, one model load per worker, the Parquet shards and
loading them into the index. Runs are timed in turns, medians over ``--repeats``; each Ray
index's vectors are compared with the single-process index's (the largest absolute difference:
0 when the single process runs torch on one thread, as each worker does, and float rounding
when it runs on more, whose sums add up in another order).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from _common import FLICKR, RESULTS, interleaved_medians, report, require_flickr
from mmret import Retriever, read_items
from mmret.scaleout.ray_encode import add_with_ray


def manifest(n_images: int, scratch: Path) -> Path:
    """The first ``n_images`` rows of Flickr8k dev, their image paths made absolute."""
    rows = [json.loads(line) for line in (FLICKR / "dev.jsonl").read_text().splitlines()]
    path = scratch / "items.jsonl"
    lines = []
    for row in rows[:n_images]:
        lines.append(json.dumps({**row, "image": str(FLICKR / row["image"])}))
    path.write_text("\n".join(lines) + "\n")
    return path


def vectors_of(folder: Path) -> dict[str, np.ndarray]:
    with Retriever.open(folder, readonly=True) as retriever:
        return retriever.stored_vectors(retriever.ids())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="starter")
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--out", type=Path, default=RESULTS / "ray_encode.json")
    args = parser.parse_args()
    require_flickr()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    scratch = Path(tempfile.mkdtemp(prefix="mmret-ray-bench-"))
    source = manifest(args.images, scratch)
    built: dict[str, Path] = {}

    def fresh(name: str) -> Path:
        folder = scratch / f"{name}.mmret"
        shutil.rmtree(folder, ignore_errors=True)
        built[name] = folder
        return folder

    def single() -> None:
        with Retriever.create(fresh("single"), model=args.model) as retriever:
            retriever.add(read_items(source))

    def distributed(workers: int) -> Callable[[], None]:
        def run() -> None:
            with Retriever.create(fresh(f"ray{workers}"), model=args.model) as retriever:
                add_with_ray(retriever, source, workers=workers, shard_size=args.shard_size)

        return run

    worker_counts = [int(n) for n in args.workers.split(",")]
    runs = {"single process": single}
    runs |= {f"ray, {n} worker{'s' * (n > 1)}": distributed(n) for n in worker_counts}
    try:
        medians = interleaved_medians(runs, args.repeats)
        reference = vectors_of(built["single"])
        difference = {}
        for n in worker_counts:
            ours = vectors_of(built[f"ray{n}"])
            difference[n] = (
                max(float(np.abs(ours[i] - reference[i]).max()) for i in reference)
                if ours.keys() == reference.keys()
                else float("inf")
            )
    finally:
        ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)
    items = len(reference)
    base = medians["single process"]
    rows = []
    for name, seconds in medians.items():
        workers = 0 if name == "single process" else int(name.split()[1])
        gap = "(reference)" if not workers else f"{difference[workers]:.1e}"
        rows.append([name, items, seconds, items / seconds, base / seconds, gap])
    report(
        f"Indexing {items} Flickr8k dev items (image + 5 captions) with {args.model}, "
        f"medians of {args.repeats}",
        ["run", "items", "seconds", "items per s", "speed-up", "max |vector difference|"],
        rows,
        args.out,
        {"model": args.model, "shard_size": args.shard_size, "repeats": args.repeats},
    )


if __name__ == "__main__":
    main()
