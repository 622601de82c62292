"""RECO quality: zero-shot CIFAR-10 and Flickr8k dev retrieval, frozen starter vs. + memory.

    python benchmarks/reco_quality.py --memory runs/memory-flickr8k-train

One table: zero-shot top-1 on ``../shared/data/cifar10-train500`` and text-to-image /
image-to-text R@1/5/10 on Flickr8k dev, for the frozen starter model and for the same
embeddings refined with each memory given (``--memory``, repeatable) by the transformer
fusion, the mean fusion, and the transformer fusion with cross-modal search (an image finds
memory texts directly), at k = 5, 10, 20. Both sides are refined (images and captions; images
and class prompts, each prompt before the ensemble mean), as ``mmret eval retrieval`` and
``mmret eval zeroshot`` do with ``--memory`` (through ``Refiner.fuse_rows``, the second half of
``Refiner.refine``: the memory is searched once per input at the largest k). Embeddings come
from mmret's cache.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from _common import FLICKR, RESULTS, report, require_flickr
from mmret.cache.embeddings import embed_images, embed_pairs
from mmret.encoders import load_encoder
from mmret.evaluation.classification import (
    DEFAULT_TEMPLATES,
    LabelledImages,
    read_class_folders,
    zero_shot_metrics,
)
from mmret.evaluation.retrieval import retrieval_metrics
from mmret.ingest.pairs import read_pairs
from mmret.late_interaction import l2_normalise
from mmret.memory.refine import load_refiner

CIFAR = FLICKR.parent / "cifar10-train500"


def scores(
    fuse: Callable[[np.ndarray, str, str], np.ndarray] | None,
    dev: Any,
    cifar: tuple[np.ndarray, Any],
    prompts: np.ndarray,
) -> list[float]:
    """Zero-shot top-1 and retrieval recalls, both sides refined by ``fuse(vectors, modality,
    dataset)`` (None: the frozen model). ``prompts (C * T, D)``: class-major prompt vectors."""
    cifar_images, data = cifar
    image, text = dev.image, dev.text
    if fuse is not None:
        image, text = fuse(image, "image", "dev-image"), fuse(text, "text", "dev-text")
        cifar_images = fuse(cifar_images, "image", "cifar")
        prompts = fuse(prompts, "text", "prompts")
    per_class = prompts.reshape(len(data.classes), len(DEFAULT_TEMPLATES), -1).mean(axis=1)
    classes = l2_normalise(per_class)
    zero_shot = zero_shot_metrics(cifar_images @ classes.T, data.labels, data.classes)
    retrieval = retrieval_metrics(image, text, dev.text_image)
    return [
        zero_shot.top1,
        *retrieval.text_to_image.values(),
        *retrieval.image_to_text.values(),
        retrieval.rsum,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--memory", type=Path, action="append", default=[], help="memory folder")
    parser.add_argument("--fusion", default="transformer", help="trained fusion (default: shipped)")
    parser.add_argument(
        "--cross-fusion",
        default=None,
        help="fusion for the cross-modal search rows (default: the --fusion one)",
    )
    parser.add_argument("--ks", default="5,10,20")
    parser.add_argument("--out", type=Path, default=RESULTS / "reco_quality.json")
    args = parser.parse_args()
    require_flickr()
    encoder = load_encoder("starter")
    dev = embed_pairs(encoder, read_pairs(FLICKR / "dev.jsonl"), show_progress=True)
    data = read_class_folders(CIFAR)
    cifar_images, ok = embed_images(encoder, data.paths, show_progress=True)
    cifar = (cifar_images[ok], LabelledImages([], data.labels[ok], data.classes))
    prompts = encoder.encode_texts(
        [template.format(name) for name in data.classes for template in DEFAULT_TEMPLATES]
    )
    inputs = {
        "dev-image": (dev.image, "image"),
        "dev-text": (dev.text, "text"),
        "cifar": (cifar[0], "image"),
        "prompts": (prompts, "text"),
    }
    ks = [int(k) for k in args.ks.split(",")]
    rows: list[list[Any]] = [["frozen starter", "-", "-", "-", *scores(None, dev, cifar, prompts)]]
    settings = (
        ("transformer", args.fusion, "uni"),
        ("mean", "mean", "uni"),
        ("transformer", args.cross_fusion or args.fusion, "cross"),
    )
    for memory in args.memory:
        for label, fusion, search in settings:
            refiner = load_refiner(memory, fusion, k=max(ks), search=search)
            # One search per input at the largest k: the first k of those are what a search
            # at k returns (same order, same exclusions), so smaller k reuse it.
            found = {
                name: refiner.memory.neighbours(
                    vectors,
                    modality,
                    max(ks),
                    search=refiner.options.search,  # type: ignore[arg-type]
                ).rows
                for name, (vectors, modality) in inputs.items()
            }
            for k in ks:

                def fuse(vectors: np.ndarray, modality: str, name: str) -> np.ndarray:
                    return refiner.fuse_rows(vectors, modality, found[name][:, :k])  # noqa: B023

                rows.append([memory.name, label, search, k, *scores(fuse, dev, cifar, prompts)])
                print(rows[-1], flush=True)
            refiner.close()
    columns = [
        "memory",
        "fusion",
        "search",
        "k",
        "CIFAR-10 top-1",
        "t2i R@1",
        "t2i R@5",
        "t2i R@10",
        "i2t R@1",
        "i2t R@5",
        "i2t R@10",
        "RSUM",
    ]
    report(
        "RECO: zero-shot CIFAR-10 (cifar10-train500) and Flickr8k dev retrieval",
        columns,
        rows,
        args.out,
        {"memories": [str(m) for m in args.memory], "fusion": args.fusion},
    )


if __name__ == "__main__":
    main()
