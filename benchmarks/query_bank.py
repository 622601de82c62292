"""Query-bank normalisation through the engine: recall and cost on Flickr8k dev.

    python benchmarks/query_bank.py [--model starter-v3] [--repeats 3]

Indexes the 1,000 Flickr8k dev photos (for text-to-image) and their 5,000 captions (for
image-to-text) with their cached embeddings by ``--model`` (exact backend), then queries every
dev caption / photo through ``Retriever.search_vectors(k=10, modality=...)`` with the model's
shipped query bank and without it. For each: R@1/5/10 of the engine's top 10 (the bank
rescores the top 50 by cosine), the same recalls computed over the full score matrix as
`mmret eval retrieval` does (the pool's approximation is the difference), and milliseconds
per query (search, store lookup and discount; queries in one call, median of the repeats,
timed in turns). The bank draws its queries from Flickr8k train, never from dev; dev chose its
beta and weight, so a held-out check follows: the setting chosen on one random half of the dev
photos (with their captions), scored on the other half, both ways round.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from _common import CONSOLE, RESULTS, flickr_embeddings, interleaved_medians, report, require_flickr
from mmret.cache.embeddings import PairEmbeddings
from mmret.encoders import DEFAULT_MODEL, load_encoder
from mmret.engine import Retriever, SearchResult
from mmret.evaluation.retrieval import recalls, retrieval_metrics
from mmret.items import Item
from mmret.query_bank import POOL, QueryBank, shipped_query_bank
from mmret.training.query_bank import choose_settings


def search_all(
    index: Retriever, queries: np.ndarray, modality: str, bank: bool
) -> Callable[[], list[list[SearchResult]]]:
    """One call searching every query (top 10), with or without the query bank."""
    return lambda: index.search_vectors(queries, k=10, modality=modality, query_bank=bank)


def held_out_halves(bank: QueryBank, dev: PairEmbeddings) -> list[dict[str, Any]]:
    """The setting chosen on one random half of the dev photos, scored on the other half."""
    owner = np.asarray(dev.text_image)
    order = np.random.default_rng(0).permutation(len(dev.image))

    def half(images: np.ndarray) -> PairEmbeddings:
        images = np.sort(images)
        keep = np.isin(owner, images)
        renumber = np.full(len(dev.image), -1)
        renumber[images] = np.arange(len(images))
        return PairEmbeddings(dev.image[images], dev.text[keep], renumber[owner[keep]])

    checks = []
    middle = len(order) // 2
    for chosen_on, scored_on in (
        (order[:middle], order[middle:]),
        (order[middle:], order[:middle]),
    ):
        choose, score = half(chosen_on), half(scored_on)
        chosen = choose_settings(bank.encoder, bank.text, bank.image, choose)
        plain = retrieval_metrics(score.image, score.text, score.text_image)
        offsets = chosen.offsets(score.image, score.text)
        normalised = retrieval_metrics(score.image, score.text, score.text_image, offsets=offsets)
        checks.append(
            {
                "beta": chosen.beta,
                "weight": chosen.weight,
                "held_out_t2i_r1": [
                    round(plain.text_to_image["R@1"], 1),
                    round(normalised.text_to_image["R@1"], 1),
                ],
                "held_out_rsum": [round(plain.rsum, 1), round(normalised.rsum, 1)],
            }
        )
        CONSOLE.print(
            f"held-out half: chosen beta {chosen.beta:g}, weight {chosen.weight:g}; t2i R@1 "
            f"{plain.text_to_image['R@1']:.1f} -> {normalised.text_to_image['R@1']:.1f}, RSUM "
            f"{plain.rsum:.1f} -> {normalised.rsum:.1f}",
            highlight=False,
        )
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "query_bank.json")
    args = parser.parse_args()
    require_flickr()
    bank = shipped_query_bank(args.model)
    if bank is None:
        raise SystemExit(f"no query bank ships for {args.model}")
    dev = flickr_embeddings("dev", args.model)
    owner = np.asarray(dev.text_image)
    full = {
        "off": retrieval_metrics(dev.image, dev.text, owner),
        "bank": retrieval_metrics(
            dev.image, dev.text, owner, offsets=bank.offsets(dev.image, dev.text)
        ),
    }
    rows: list[list[Any]] = []
    extra: dict[str, Any] = {
        "model": args.model,
        "bank": {
            "beta": bank.beta,
            "weight": bank.weight,
            "texts": len(bank.text),
            "images": len(bank.image),
        },
        "pool": POOL,
    }
    encoder = load_encoder(args.model)
    with tempfile.TemporaryDirectory() as scratch:
        directions = {
            "text→image": (dev.image, dev.text, "text", lambda q: [int(owner[q])]),
            "image→text": (
                dev.text,
                dev.image,
                "image",
                lambda q: np.flatnonzero(owner == q).tolist(),
            ),
        }
        for number, (direction, (items, queries, modality, hits_of)) in enumerate(
            directions.items()
        ):
            folder = Path(scratch) / f"index-{number}"
            with Retriever.create(folder, encoder=encoder) as index:
                index.add_vectors([Item(str(i), text="x") for i in range(len(items))], items)
                runs = {
                    name: search_all(index, queries, modality, bank_on)
                    for name, bank_on in (("off", False), ("bank", True))
                }
                seconds = interleaved_medians(runs, args.repeats)
                for name, run in runs.items():
                    found = run()
                    ranks = np.array(
                        [
                            next(
                                (r + 1 for r, hit in enumerate(hits) if int(hit.id) in hits_of(q)),
                                11,
                            )
                            for q, hits in enumerate(found)
                        ]
                    )
                    engine = recalls(ranks)
                    matrix = (
                        full[name].text_to_image if modality == "text" else full[name].image_to_text
                    )
                    rows.append(
                        [
                            direction,
                            "query bank" if name == "bank" else "cosine",
                            *(f"{v:.1f}" for v in engine.values()),
                            *(f"{v:.1f}" for v in matrix.values()),
                            f"{1000 * seconds[name] / len(queries):.2f}",
                        ]
                    )
    extra["held_out_halves"] = held_out_halves(bank, dev)
    columns = [
        "direction",
        "scores",
        "R@1",
        "R@5",
        "R@10",
        "full-matrix R@1",
        "R@5",
        "R@10",
        "ms/query",
    ]
    extra["rsum_full_matrix"] = {name: round(r.rsum, 1) for name, r in full.items()}
    report(f"Flickr8k dev through the engine ({args.model}, k=10)", columns, rows, args.out, extra)


if __name__ == "__main__":
    main()
