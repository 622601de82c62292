"""The multimodal-document task (M2KR style), built from any captioned manifest.

Each image with its FIRST caption is one document; the image's other captions are the queries,
and a query's only relevant document is its image's (text -> image+text). Since a query is
never the document's own caption, a model has to match the query against the picture and
against a paraphrase; comparing with the same documents reduced to their image or to their
text shows whether it uses both halves.

:func:`write_document_task` writes it as ``mmret eval ir`` inputs::

    queries.jsonl        {"id": "q<row>", "text": caption}
    corpus.jsonl         {"id": image id, "image": path, "text": first caption}
    corpus-image.jsonl   the same documents, image only
    corpus-text.jsonl    the same documents, text only
    qrels.tsv            q<row> 0 <image id> 1   (TREC)

Images with a single caption stay in the corpus (as distractors) and give no query.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmret.errors import InputError
from mmret.evaluation.ir import IRReport, ir_metrics
from mmret.ingest.pairs import PairSet

#: Document forms: both halves, then each alone.
DOCUMENT_FORMS = ("image+text", "image", "text")


def document_split(text_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(N,)`` the document caption of each image (its first) and the ``(Q,)`` query captions.

    ``text_image (T,)`` is each caption's image, captions in manifest order.

    >>> doc, queries = document_split(np.array([0, 0, 1, 1, 1, 2]))
    >>> doc.tolist(), queries.tolist()
    ([0, 2, 5], [1, 3, 4])
    """
    owner = np.asarray(text_image, dtype=np.int64)
    count = int(owner.max(initial=-1)) + 1
    first = np.full(count, -1, dtype=np.int64)
    # Reversed assignment leaves each image's smallest caption row in place.
    rows = np.arange(len(owner))
    first[owner[::-1]] = rows[::-1]
    if (first < 0).any():
        raise InputError("every image needs at least one caption for the document task")
    queries = np.flatnonzero(first[owner] != rows)
    return first, queries


@dataclass(frozen=True)
class DocumentTaskReport:
    """``eval ir`` metrics (percent) per document form."""

    forms: dict[str, IRReport]

    def to_dict(self) -> dict[str, Any]:
        return {
            form: {**report.recall, "MRR@10": report.mrr, "n_queries": report.n_queries}
            for form, report in self.forms.items()
        }


def document_task_metrics(
    embed_documents: Callable[[np.ndarray | None, np.ndarray | None], np.ndarray],
    text_queries: np.ndarray,
    text_image: np.ndarray,
    token_dim: int | None,
    forms: tuple[str, ...] = ("image+text",),
) -> DocumentTaskReport:
    """The task scored on precomputed embeddings.

    ``embed_documents(image_rows, caption_rows)`` embeds documents (either may be None for the
    reduced forms); ``text_queries (T, D)`` are every caption embedded as a query.
    """
    first, queries = document_split(text_image)
    images = np.arange(len(first))
    owner = np.asarray(text_image, dtype=np.int64)
    query_ids = [f"q{row}" for row in queries]
    doc_ids = [str(i) for i in images]
    qrels = {f"q{row}": {str(owner[row]): 1} for row in queries}
    reports = {}
    for form in forms:
        documents = embed_documents(
            images if "image" in form else None, first if "text" in form else None
        )
        reports[form] = ir_metrics(
            text_queries[queries], documents, query_ids, doc_ids, qrels, token_dim=token_dim
        )
    return DocumentTaskReport(reports)


def write_document_task(pairs: PairSet, out: Path) -> dict[str, int]:
    """Write the task's queries, corpora and qrels (see the module docstring) into ``out``.

    Returns the number of queries and documents.
    """
    first, queries = document_split(pairs.text_image)
    out.mkdir(parents=True, exist_ok=True)
    corpora: dict[str, list[str]] = {form: [] for form in DOCUMENT_FORMS}
    for image, (image_id, path) in enumerate(zip(pairs.image_ids, pairs.images, strict=True)):
        text = pairs.texts[first[image]]
        both = {"id": image_id, "image": str(path.resolve()), "text": text}
        corpora["image+text"].append(json.dumps(both))
        corpora["image"].append(json.dumps({"id": image_id, "image": both["image"]}))
        corpora["text"].append(json.dumps({"id": image_id, "text": text}))
    for form, name in zip(DOCUMENT_FORMS, CORPUS_FILES, strict=True):
        (out / name).write_text("\n".join(corpora[form]) + "\n", encoding="utf-8")
    lines = [json.dumps({"id": f"q{row}", "text": pairs.texts[row]}) for row in queries]
    (out / QUERIES_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    judgements = [f"q{row} 0 {pairs.image_ids[pairs.text_image[row]]} 1" for row in queries]
    (out / QRELS_FILE).write_text("\n".join(judgements) + "\n", encoding="utf-8")
    return {"queries": len(queries), "documents": len(first)}


QUERIES_FILE = "queries.jsonl"
QRELS_FILE = "qrels.tsv"
CORPUS_FILES = ("corpus.jsonl", "corpus-image.jsonl", "corpus-text.jsonl")
