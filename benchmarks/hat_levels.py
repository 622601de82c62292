"""HAT on Flickr8k: levels and level weights against the starter, quality and encoding speed.

    python benchmarks/hat_levels.py [--variants L1,L3] [--images 64] [--texts 512] [--quick]

Every variant trains on the stored layer features of Flickr8k train (extracted once, then
reused; see ``mmret.cache.layer_features``) with dev-RSUM epoch selection, exactly as
``mmret train hat`` does, and is scored on the stored dev features (float16, so recalls can
differ from ``mmret eval retrieval`` in the second decimal). The starter row scores the
shipped alignment head on the same stored features. Heads are kept in ``--heads`` (one folder
per variant, with its checkpoint), so a rerun only trains what is missing. Speed: images/s
and captions/s of the starter and of a HAT encoder on Flickr8k dev, timed in turns, medians.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _common import CONSOLE, FLICKR, RESULTS, interleaved_medians, report
from mmret.cache.layer_features import LayerFeatureSet, layer_feature_set
from mmret.encoders import load_encoder
from mmret.encoders.starter import StarterEncoder
from mmret.evaluation.retrieval import RetrievalReport, retrieval_metrics
from mmret.ingest.pairs import read_pairs
from mmret.training.hat import HatTrainingConfig, embed_set, train_hat

BASE = HatTrainingConfig(learn_weights=True)
VARIANTS = {
    "L1": replace(BASE, image_layers=(8,), text_layers=(6,)),
    "L2": replace(BASE, image_layers=(7, 8), text_layers=(4, 6)),
    "L2-fixed": replace(BASE, image_layers=(7, 8), text_layers=(4, 6), learn_weights=False),
    "L3": replace(BASE, image_layers=(5, 7, 8), text_layers=(2, 4, 6)),
    "L3-fixed": replace(BASE, image_layers=(5, 7, 8), text_layers=(2, 4, 6), learn_weights=False),
    "L4": replace(BASE, image_layers=(4, 5, 7, 8), text_layers=(1, 2, 4, 6)),
}


def starter_vectors(starter: StarterEncoder, dev: LayerFeatureSet) -> tuple[np.ndarray, ...]:
    """``(N, D)`` image and ``(T, D)`` caption unit vectors of the shipped alignment head on
    the stored last layers (what ``starter`` encodes)."""
    rows_i, rows_t = np.arange(len(dev.image_ids)), np.arange(len(dev.text_image))
    with torch.inference_mode():
        image = starter.head.image(dev.image[8].read_pooled(rows_i))
        text = starter.head.text(torch.nn.functional.normalize(dev.text[6].read_pooled(rows_t)))
        image = torch.nn.functional.normalize(image, dim=-1).numpy()
        text = torch.nn.functional.normalize(text, dim=-1).numpy()
    return image, text


def starter_dev(starter: StarterEncoder, dev: LayerFeatureSet) -> RetrievalReport:
    """The shipped alignment head's dev metrics on the stored last layers."""
    image, text = starter_vectors(starter, dev)
    return retrieval_metrics(image, text, dev.text_image)


def row(name: str, levels: str, weights: str, metrics: RetrievalReport) -> list[str]:
    t2i, i2t = metrics.text_to_image, metrics.image_to_text
    recalls = [t2i["R@1"], t2i["R@5"], t2i["R@10"], i2t["R@1"], i2t["R@5"], i2t["R@10"]]
    return [name, levels, weights, *(f"{r:.1f}" for r in recalls), f"{metrics.rsum:.1f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--heads", type=Path, default=RESULTS / "hat_heads")
    parser.add_argument("--images", type=int, default=64, help="for the speed test")
    parser.add_argument("--texts", type=int, default=512, help="for the speed test")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--speed-variant", default="L2-fixed")
    parser.add_argument("--out", type=Path, default=RESULTS / "hat_levels.json")
    parser.add_argument("--quick", action="store_true", help="one 1-epoch variant, tiny timing")
    args = parser.parse_args()
    if args.quick:
        VARIANTS["L1"] = replace(VARIANTS["L1"], epochs=1)
        args.variants, args.speed_variant, args.heads = "L1", "L1", Path(tempfile.mkdtemp())
        args.images, args.texts, args.repeats = 8, 32, 1
    chosen = args.variants.split(",")
    starter = load_encoder("starter")
    assert isinstance(starter, StarterEncoder)
    image_layers = sorted({n for v in chosen for n in VARIANTS[v].image_layers} | {8})
    text_layers = sorted({n for v in chosen for n in VARIANTS[v].text_layers} | {6})

    def stored(split: str) -> LayerFeatureSet:
        pairs = read_pairs(FLICKR / f"{split}.jsonl")
        return layer_feature_set(pairs, starter, image_layers, text_layers, show_progress=True)

    train, dev = stored("train"), stored("dev")
    rows = [row("starter (alignment head)", "8 / 6", "-", starter_dev(starter, dev))]
    results: dict[str, Any] = {"starter": rows[0]}
    for name in chosen:
        config = VARIANTS[name]
        folder = args.heads / name
        started = time.perf_counter()
        head, history = train_hat(
            train,
            dev,
            config,
            backbone="starter",
            layer_source=starter.layer_source,
            checkpoint_dir=folder / "checkpoint",
            show_progress=True,
        )
        head.save(folder)
        metrics = retrieval_metrics(*embed_set(head, dev), dev.text_image)
        weights = " ".join(f"{w:.2f}" for w in head.weights.tolist())
        levels = (
            f"{','.join(map(str, config.image_layers))} / {','.join(map(str, config.text_layers))}"
        )
        rows.append(row(f"HAT {name}", levels, weights, metrics))
        results[name] = {
            "row": rows[-1],
            "config": config.to_dict(),
            "train_seconds": time.perf_counter() - started,
            "best_epoch": max(history, key=lambda e: e["dev"]["rsum"])["epoch"],
        }
        CONSOLE.print(" | ".join(rows[-1]))
    speeds = speed(args, starter)
    results["speed"] = speeds
    columns = ["model", "levels (image / text)", "weights"]
    columns += ["t2i R@1", "R@5", "R@10", "i2t R@1", "R@5", "R@10", "RSUM"]
    report(
        "HAT levels on Flickr8k dev (stored features)",
        columns,
        rows,
        args.out,
        results,
    )


def speed(args: argparse.Namespace, starter: StarterEncoder) -> dict[str, float]:
    rows = [json.loads(line) for line in (FLICKR / "dev.jsonl").read_text().splitlines()]
    images = [FLICKR / r["image"] for r in rows][: args.images]
    texts = [c for r in rows for c in r["captions"]][: args.texts]
    hat = load_encoder(f"hat:{args.heads / args.speed_variant}")
    seconds = interleaved_medians(
        {
            "starter images": lambda: starter.encode_images(images),
            "hat images": lambda: hat.encode_images(images),
            "starter captions": lambda: starter.encode_texts(texts),
            "hat captions": lambda: hat.encode_texts(texts),
        },
        args.repeats,
    )
    per_second = {
        name: (len(images) if "images" in name else len(texts)) / value
        for name, value in seconds.items()
    }
    CONSOLE.print(per_second)
    return per_second


if __name__ == "__main__":
    main()
