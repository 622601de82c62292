"""RECO quality: zero-shot CIFAR-10 and Flickr8k dev retrieval, frozen starter vs. + memory.

    python benchmarks/reco_quality.py --memory runs/memory-flickr8k-train

One table: zero-shot top-1 on ``../shared/data/cifar10-train500`` and text-to-image /
image-to-text R@1/5/10 on Flickr8k dev, for the frozen starter model and for the same
embeddings refined with each memory given (``--memory``, repeatable) by the transformer
fusion, the mean fusion, and the transformer fusion with cross-modal search (an image finds
memory texts directly), at k = 5, 10, 20. Both sides are refined (images and captions; images
and class prompts, each prompt before the ensemble mean), exactly as ``mmret eval retrieval`` and
``mmret eval zeroshot`` do with ``--memory``. Embeddings come from mmret's cache.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from _common import FLICKR, RESULTS, report, require_flickr
from mmret.encoders import load_encoder
from mmret.evaluation.classification import (
    DEFAULT_TEMPLATES,
    class_embeddings,
    read_class_folders,
    zero_shot_metrics,
)
from mmret.evaluation.embeddings import embed_images, embed_pairs
from mmret.evaluation.retrieval import retrieval_metrics
from mmret.memory.refine import Refiner, load_refiner
from mmret.training.features import read_pairs

CIFAR = FLICKR.parent / "cifar10-train500"


def scores(
    refiner: Refiner | None, dev: Any, cifar: tuple[np.ndarray, np.ndarray, Any]
) -> list[float]:
    encoder = load_encoder("starter")
    image, text = dev.image, dev.text
    cifar_images, ok, data = cifar
    cifar_images = cifar_images[ok]
    if refiner is not None:
        image, text = refiner.refine(image, "image"), refiner.refine(text, "text")
        cifar_images = refiner.refine(cifar_images, "image")
        encoder = refiner.wrap(encoder)
    classes = class_embeddings(encoder, data.classes, DEFAULT_TEMPLATES)
    zero_shot = zero_shot_metrics(cifar_images @ classes.T, data.labels[ok], data.classes)
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
    cifar = (cifar_images, ok, data)
    rows: list[list[Any]] = [["frozen starter", "-", "-", "-", *scores(None, dev, cifar)]]
    settings = (
        ("transformer", args.fusion, "uni"),
        ("mean", "mean", "uni"),
        ("transformer, cross-modal search", args.cross_fusion or args.fusion, "cross"),
    )
    for memory in args.memory:
        for label, fusion, search in settings:
            for k in (int(k) for k in args.ks.split(",")):
                refiner = load_refiner(memory, fusion, k=k, search=search)
                rows.append([memory.name, label, search, k, *scores(refiner, dev, cifar)])
                refiner.close()
                print(rows[-1], flush=True)
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
