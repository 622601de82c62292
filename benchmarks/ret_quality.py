"""ReT on Flickr8k dev next to the starter and HAT: retrieval both ways and the document task.

    python benchmarks/ret_quality.py --models ReT=src/mmret/weights/ret,no-gates=DIR,... [--quick]

Every model is scored on the stored dev layer features (float16; see
``mmret.cache.layer_features``), so recalls can differ from ``mmret eval`` in the second
decimal. Columns: text-to-image and image-to-text R@1/5/10 (the standard protocol, 1,000
images and 5,000 captions), then the multimodal-document task of
``mmret.evaluation.documents`` (4,000 caption queries against 1,000 image+first-caption
documents) R@1/5/10 and MRR@10, and its R@1 with the documents reduced to their image or to
their text. A single-vector model embeds an image+text document as it always does (the
normalised sum of its two unit vectors); ReT encodes it jointly. ReT models are trained by
``mmret train ret`` (the model card lists the commands); this script only scores them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _common import CONSOLE, FLICKR, RESULTS, report
from hat_levels import starter_vectors
from mmret.cache.layer_features import LayerFeatureSet, layer_feature_set
from mmret.encoders import load_encoder
from mmret.encoders.starter import StarterEncoder
from mmret.evaluation.documents import DOCUMENT_FORMS, DocumentTaskReport, document_task_metrics
from mmret.evaluation.retrieval import RetrievalReport, retrieval_metrics
from mmret.heads.hat import HierarchicalAlignmentHead
from mmret.heads.ret import RetModel
from mmret.ingest.pairs import read_pairs
from mmret.late_interaction import l2_normalise
from mmret.training.hat import embed_set
from mmret.training.ret import evaluate_stored

SHIPPED = Path(__file__).resolve().parents[1] / "src" / "mmret" / "weights"


def single_vector(
    image: np.ndarray, text: np.ndarray, owner: np.ndarray
) -> tuple[RetrievalReport, DocumentTaskReport]:
    """Both tasks for one-vector ``(N, D)`` images and ``(T, D)`` captions."""

    def documents(image_rows: np.ndarray | None, text_rows: np.ndarray | None) -> np.ndarray:
        total = np.zeros((len(image), image.shape[1]), dtype=np.float32)
        if image_rows is not None:
            total += image[image_rows]
        if text_rows is not None:
            total += text[text_rows]
        return l2_normalise(total)

    retrieval = retrieval_metrics(image, text, owner)
    return retrieval, document_task_metrics(documents, text, owner, None, DOCUMENT_FORMS)


def row(name: str, retrieval: RetrievalReport, documents: DocumentTaskReport) -> list[Any]:
    t2i, i2t = retrieval.text_to_image, retrieval.image_to_text
    both = documents.forms["image+text"]
    values = [t2i["R@1"], t2i["R@5"], t2i["R@10"], i2t["R@1"], i2t["R@5"], i2t["R@10"]]
    values += [both.recall["R@1"], both.recall["R@5"], both.recall["R@10"], both.mrr]
    cells = [f"{value:.1f}" for value in values]
    for form in ("image", "text"):
        cells.append(
            f"{documents.forms[form].recall['R@1']:.1f}" if form in documents.forms else "-"
        )
    return [name, *cells]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        default=f"ReT={SHIPPED / 'ret'}",
        help="comma-separated NAME=DIR of ReT model folders",
    )
    parser.add_argument(
        "--reduced",
        default="ReT",
        help="comma-separated models also scored on the image-only and text-only documents "
        "(each form costs a full MaxSim pass; the single-vector rows always get them)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "ret_quality.json")
    parser.add_argument("--quick", action="store_true", help="the first 100 dev images only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    starter = load_encoder("starter")
    assert isinstance(starter, StarterEncoder)
    models = dict(part.split("=", 1) for part in args.models.split(",") if part)
    loaded = {name: RetModel.load(Path(folder)) for name, folder in models.items()}
    hat = HierarchicalAlignmentHead.load(SHIPPED / "hat")
    image_layers = {8, *hat.config.image_layers}
    text_layers = {6, *hat.config.text_layers}
    for model in loaded.values():
        image_layers |= set(model.config.image_layers)
        text_layers |= set(model.config.text_layers)
    dev = layer_feature_set(
        read_pairs(FLICKR / "dev.jsonl"),
        starter,
        sorted(image_layers),
        sorted(text_layers),
        show_progress=True,
    )
    if args.quick:
        dev = first_images(dev, 100)
    owner = np.asarray(dev.text_image)

    def cut(vectors: tuple[np.ndarray, ...]) -> tuple[np.ndarray, np.ndarray]:
        """The rows of the (possibly --quick-cut) set; embed_set embeds every stored row."""
        return vectors[0][: len(dev.image_ids)], vectors[1][: len(owner)]

    scored: dict[str, Callable[[], tuple[RetrievalReport, DocumentTaskReport]]] = {
        "starter (single vector)": lambda: single_vector(
            *cut(starter_vectors(starter, dev)), owner
        ),
        "HAT (shipped)": lambda: single_vector(*cut(embed_set(hat, dev)), owner),
    }
    reduced = set(args.reduced.split(","))
    for name, model in loaded.items():
        forms = DOCUMENT_FORMS if name in reduced else DOCUMENT_FORMS[:1]
        scored[name] = lambda model=model, forms=forms: _ret(model, dev, forms)  # type: ignore[misc]
    rows, results = [], {}
    for name, score in scored.items():
        retrieval, documents = score()
        rows.append(row(name, retrieval, documents))
        results[name] = {"retrieval": retrieval.to_dict(), "documents": documents.to_dict()}
        if name in loaded:
            results[name]["config"] = loaded[name].config.to_dict()
        CONSOLE.print(" | ".join(rows[-1]))
    columns = ["model", "t2i R@1", "R@5", "R@10", "i2t R@1", "R@5", "R@10"]
    columns += ["doc R@1", "R@5", "R@10", "MRR@10", "image-only R@1", "text-only R@1"]
    report("ReT on Flickr8k dev (stored features)", columns, rows, args.out, results)


def _ret(
    model: RetModel, dev: LayerFeatureSet, forms: tuple[str, ...]
) -> tuple[RetrievalReport, DocumentTaskReport]:
    retrieval, documents = evaluate_stored(model, dev, forms=forms)
    assert documents is not None
    return retrieval, documents


def first_images(features: LayerFeatureSet, count: int) -> LayerFeatureSet:
    """The set cut to its first ``count`` images and their captions (for ``--quick``)."""
    keep = np.asarray(features.text_image) < count
    if not keep[: int(keep.sum())].all():
        raise SystemExit("--quick expects captions stored image by image")
    return LayerFeatureSet(
        features.folder,
        features.image_ids[:count],
        np.asarray(features.text_image)[keep],
        features.image,
        features.text,
    )


if __name__ == "__main__":
    main()
