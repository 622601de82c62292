"""Retrieve fast, rerank smart on Flickr8k dev: first stages alone and reranked at several N.

    python benchmarks/rerank_dev.py --model joint=DIR [--model separate=DIR@20] \
        [--sizes 10,20,50,100] [--captions 1000] [--images 200] [--ceiling 100] \
        [--first-stage starter-v3@10,20,50,100]

For each reranker folder (``mmret train rerank``; default the shipped one): its own first
stage (the bi-encoder it was trained with) alone and with its top N reranked by its
cross-encoder (``DIR@10,20`` picks a model's own N, default ``--sizes``): t2i and i2t
R@1/5/10 and the reranking's milliseconds per query (reading the candidates' stored token
features plus the cross-encoder, one query at a time). ``--first-stage SPEC@N,...``
(repeatable) has the first model rerank that encoder's first stage too (what ``mmret search
--rerank`` does on an index built with it): the cross-encoder alone, and, where the reranker
was calibrated for that model (``mmret train rerank-calibrate``), plus the first stage's score
times the calibrated weight; where a query bank ships for that model, its first stage
normalised with it too (what searches of its indexes use by default), with the weight
calibrated for that. ``--ceiling Q`` scores Q sampled captions against all 1,000 images
(and Q / 5 images against all 5,000 captions) with the cross-encoder alone: what it reaches
without a first stage. ``--captions`` and ``--images`` sample the queries (fixed seed) to
keep the run short on a busy machine; every row of a model scores the same queries (its first
stage row is "rerank top 1", which reorders nothing). Queries are drawn from the dev rows the
model's training did not use to choose its epoch and cosine weight (``training.json``), the
same for models trained with the same seed. Everything reads the stored dev layer features
(float16), as search reads the features stored beside an index.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _common import FLICKR, RESULTS, report, require_flickr
from mmret.cache.embeddings import embed_pairs
from mmret.cache.layer_features import LayerFeatureSet, layer_feature_set
from mmret.encoders import load_encoder
from mmret.evaluation.reranked import (
    RerankedReport,
    StoredSides,
    reranked_ranks,
    reranked_retrieval,
)
from mmret.evaluation.retrieval import RetrievalReport, recalls, retrieval_metrics
from mmret.ingest.pairs import PairSet, read_pairs
from mmret.query_bank import shipped_query_bank
from mmret.reranker import SHIPPED_RERANKER, first_stage_name, load_reranker
from mmret.training.cross_encoder import dev_sample, training_config
from mmret.training.cross_encoder_data import embed_stored

#: A first stage: its name, ``(image, text)`` vectors, the query bank's offsets (or None),
#: the rerank depths and the first-stage weights to rerank with.
Stage = tuple[
    str, tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray] | None, list[int], list[float]
]


def unseen_rows(folder: Path, captions: int, images: int) -> tuple[np.ndarray, np.ndarray]:
    """The dev caption and image rows a model's training did not rerank: training chose its
    epoch and calibrated its cosine weight on a dev sample (``training.json`` beside the
    weights records how it was drawn), so those rows are left out of its evaluation."""
    config = training_config(folder)
    if config is None:
        return np.arange(captions), np.arange(images)
    seen = dev_sample(config, captions, images)
    return (
        np.setdiff1d(np.arange(captions), seen[0]),
        np.setdiff1d(np.arange(images), seen[1]),
    )


def recall_cells(metrics: RetrievalReport) -> list[str]:
    t2i, i2t = metrics.text_to_image, metrics.image_to_text
    return [f"{v:.1f}" for v in (*t2i.values(), *i2t.values())]


def ceiling(
    model: Any, sides: StoredSides, owner: np.ndarray, queries: int, seed: int
) -> tuple[dict[str, float], dict[str, float], float]:
    """Cross-encoder alone over the whole collection for a sample of queries."""
    rng = np.random.default_rng(seed)
    captions = np.sort(rng.choice(len(owner), queries, replace=False))
    images = np.sort(rng.choice(owner.max() + 1, max(1, queries // 5), replace=False))
    captions_of = [np.flatnonzero(owner == i) for i in range(owner.max() + 1)]
    flat = np.zeros((len(captions), owner.max() + 1))  # every candidate tied: all reranked
    t2i, t2i_s = reranked_ranks(
        model,
        flat,
        lambda q: owner[captions[q : q + 1]],
        lambda rows: sides.texts(captions[rows]),
        sides.images,
        flat.shape[1],
    )
    flat_t = np.zeros((len(images), len(owner)))
    i2t, _ = reranked_ranks(
        model,
        flat_t,
        lambda q: captions_of[images[q]],
        lambda rows: sides.images(images[rows]),
        sides.texts,
        flat_t.shape[1],
    )
    return recalls(t2i), recalls(i2t), 1000.0 * t2i_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", default=[], help="NAME=DIR (repeatable)")
    parser.add_argument("--sizes", default="10,20,50,100")
    parser.add_argument("--captions", type=int, default=0, help="caption queries (0: all)")
    parser.add_argument("--images", type=int, default=0, help="image queries (0: all)")
    parser.add_argument("--ceiling", type=int, default=100, help="sampled captions (0: skip)")
    parser.add_argument(
        "--first-stage", action="append", default=[], help="SPEC@N,...: rerank its top N too"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "rerank_dev.json")
    args = parser.parse_args()
    require_flickr()
    torch.set_num_threads(args.threads)
    models = dict(part.split("=", 1) for part in args.model) or {"shipped": str(SHIPPED_RERANKER)}

    def numbers(text: str) -> list[int]:
        return [int(n) for n in text.split(",") if n]

    sizes = numbers(args.sizes)
    rows: list[list[Any]] = []
    extra: dict[str, Any] = {"models": models, "sizes": sizes}
    for number, (name, spec) in enumerate(models.items()):
        rng = np.random.default_rng(0)  # models whose training saw the same rows: same sample
        folder, _, own_sizes = spec.partition("@")
        reranker = load_reranker(folder)
        config = reranker.model.config
        pairs = read_pairs(FLICKR / "dev.jsonl")
        dev: LayerFeatureSet = layer_feature_set(
            pairs,
            reranker.backbone,
            [config.image_layer],
            [config.text_layer],
        )
        owner = np.asarray(dev.text_image)
        sides = StoredSides(dev, config.image_layer, config.text_layer)
        caption_pool, image_pool = unseen_rows(Path(folder), len(owner), len(dev.image_ids))
        captions = (
            np.sort(rng.choice(caption_pool, args.captions, replace=False))
            if args.captions
            else caption_pool
        )
        images = (
            np.sort(rng.choice(image_pool, args.images, replace=False))
            if args.images
            else image_pool
        )
        own = embed_stored(reranker.model, dev)
        stages: list[Stage] = [("own bi-encoder", own, None, numbers(own_sizes) or sizes, [0.0])]
        for first_stage in args.first_stage if number == 0 else []:
            encoder_spec, _, depths = first_stage.partition("@")
            weight = reranker.first_stage_weight(encoder_spec)
            vectors = _first_stage_vectors(encoder_spec, pairs, len(dev.image_ids))
            depth_list = numbers(depths) or sizes
            stages.append((encoder_spec, vectors, None, depth_list, sorted({0.0, weight})))
            bank = shipped_query_bank(encoder_spec)
            if bank is not None:  # what searches of its indexes use by default
                normalised = first_stage_name(encoder_spec, refined=False, query_bank=True)
                weights = sorted({0.0, reranker.first_stage_weight(normalised)})
                stages.append((normalised, vectors, bank.offsets(*vectors), depth_list, weights))
        for stage, (image, text), offsets, depths, weights in stages:
            full = retrieval_metrics(image, text, owner, offsets=offsets)
            extra[f"{name} / {stage} / first stage, all queries"] = full.to_dict()
            rerank = partial(
                reranked_retrieval,
                reranker.model,
                image,
                text,
                owner,
                sides,
                captions=captions,
                images=images,
                offsets=offsets,
            )
            first = rerank(1).report
            rows.append(
                [name, stage, "-", "-", *recall_cells(first), "-", "-", f"{first.rsum:.1f}"]
            )
            for weight in weights:
                for n in depths:
                    result: RerankedReport = rerank(n, first_stage_weight=weight)
                    rows.append(
                        [
                            name,
                            stage,
                            f"{weight:g}" if stage != "own bi-encoder" else "-",
                            n,
                            *recall_cells(result.report),
                            f"{result.ms_per_query_text_to_image:.1f}",
                            f"{result.ms_per_query_image_to_text:.1f}",
                            f"{result.report.rsum:.1f}",
                        ]
                    )
        if args.ceiling and number == 0:
            t2i, i2t, ms = ceiling(reranker.model, sides, owner, args.ceiling, seed=1)
            cells = [f"{v:.1f}" for v in (*t2i.values(), *i2t.values())]
            label = f"cross-encoder alone ({args.ceiling} captions, {args.ceiling // 5} images)"
            rows.append([name, label, "-", "all", *cells, f"{ms:.0f}", "-", "-"])
    columns = ["model", "first stage", "first-stage weight", "rerank N", "t2i R@1", "R@5"]
    columns += ["R@10", "i2t R@1", "R@5"]
    columns += ["R@10", "t2i ms/q", "i2t ms/q", "RSUM"]
    extra["queries"] = {"captions": args.captions or "all", "images": args.images or "all"}
    report("Flickr8k dev: first stage and reranked", columns, rows, args.out, extra)


def _first_stage_vectors(spec: str, pairs: PairSet, images: int) -> tuple[np.ndarray, np.ndarray]:
    """An encoder's unit vectors of the dev images and captions (cached like `mmret eval`)."""
    embedded = embed_pairs(load_encoder(spec), pairs, show_progress=True)
    if len(embedded.image) != images:
        raise SystemExit(f"{spec} and the token features kept different dev images")
    return embedded.image, embedded.text


if __name__ == "__main__":
    main()
