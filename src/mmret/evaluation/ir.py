"""General multimodal retrieval metrics (M-BEIR / M2KR style) from graded relevance judgements.

Each query ranks the whole corpus by score; ties keep corpus order (a stable sort), so the
numbers are deterministic. With ``rel > 0`` meaning relevant:

* **R@K**: percentage of queries with at least one relevant document in the top K (the hit
  rate M-BEIR and M2KR report; classic recall when each query has one relevant document);
* **MRR@10**: mean reciprocal rank of the first relevant document, 0 when it is below 10;
* **nDCG@10**: ``DCG = sum(rel_i / log2(i + 1))`` over ranks i = 1..10 (linear gain, as
  trec_eval and BEIR), divided by the DCG of the ideal ordering of the query's judged
  documents (negative grades count as 0).

Only queries with at least one relevant judgement are scored. The functions return fractions
(0-1) for MRR and nDCG; :func:`ir_metrics` reports everything in percent, like the other
``mmret eval`` numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmret.errors import InputError
from mmret.late_interaction import similarity

#: query id -> document id -> graded relevance
Qrels = dict[str, dict[str, int]]
KS = (1, 5, 10)
_CHUNK = 256


def read_qrels(path: Path) -> Qrels:
    """TREC qrels (``qid 0 docid rel``) or BEIR's 3 columns (``qid docid rel``, with or without
    a header line), separated by tabs or spaces."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    qrels: Qrels = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) not in (3, 4):
            raise InputError(f"{path.name}:{number}: expected 'qid 0 docid rel' or 'qid docid rel'")
        try:
            relevance = int(fields[-1])
        except ValueError:
            if number == 1:
                continue  # a header such as BEIR's "query-id corpus-id score"
            raise InputError(
                f"{path.name}:{number}: relevance {fields[-1]!r} is not an integer"
            ) from None
        qrels.setdefault(fields[0], {})[fields[-2]] = relevance
    if not qrels:
        raise InputError(f"{path}: no judgements")
    return qrels


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """``(Q, min(k, N))`` column indices of the best scores per row of ``(Q, N)``, best first,
    ties in column order.

    >>> top_k(np.array([[0.1, 0.5, 0.5, 0.9]]), 3).tolist()
    [[3, 1, 2]]
    """
    k = min(k, scores.shape[1])
    order: np.ndarray = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order


def gains(
    ranked: np.ndarray, doc_ids: Sequence[str], judged: Sequence[Mapping[str, int]]
) -> np.ndarray:
    """``(Q, K)`` relevance grades of the ranked ``(Q, K)`` corpus indices (0 when unjudged)."""
    out = np.zeros(ranked.shape, dtype=np.float64)
    for q, row in enumerate(ranked):
        grades = judged[q]
        out[q] = [grades.get(doc_ids[d], 0) for d in row]
    return out


def recall_at(grades: np.ndarray, k: int) -> float:
    """Percentage of rows of ``(Q, K)`` grades with a relevant (> 0) one in the first k.

    >>> recall_at(np.array([[0, 2, 0], [0, 0, 0]]), 2)
    50.0
    """
    return float(100.0 * np.mean((grades[:, :k] > 0).any(axis=1)))


def mrr_at(grades: np.ndarray, k: int = 10) -> float:
    """Mean reciprocal rank of the first relevant grade within the first k of ``(Q, K)``.

    >>> mrr_at(np.array([[0, 1, 1], [3, 0, 0], [0, 0, 0]]), 10)
    0.5
    """
    relevant = grades[:, :k] > 0
    first = relevant.argmax(axis=1)
    return float(np.mean(np.where(relevant.any(axis=1), 1.0 / (first + 1), 0.0)))


def ndcg_at(grades: np.ndarray, ideal: np.ndarray, k: int = 10) -> float:
    """Mean nDCG@k of ranked ``(Q, K)`` grades given ``(Q, M)`` ideal (judged) grades.

    >>> round(ndcg_at(np.array([[0.0, 2.0]]), np.array([[2.0, 1.0]]), 10), 4)
    0.4796
    """
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    ranked = np.maximum(grades[:, :k], 0)
    best = -np.sort(-np.maximum(ideal, 0), axis=1)[:, :k]
    dcg = ranked @ discount[: ranked.shape[1]]
    idcg = best @ discount[: best.shape[1]]
    return float(np.mean(np.divide(dcg, idcg, out=np.zeros_like(dcg), where=idcg > 0)))


@dataclass(frozen=True)
class IRReport:
    """R@1/5/10, MRR@10 and nDCG@10, all in percent, over ``n_queries`` judged queries.

    ``ranks (Q,)`` is each query's rank of its first relevant document among its top
    ``max_k`` (``max_k + 1`` when none is there), for curves.
    """

    recall: dict[str, float]
    mrr: float
    ndcg: float
    n_queries: int
    n_docs: int
    ranks: np.ndarray


def ir_metrics(
    query_vectors: np.ndarray,
    doc_vectors: np.ndarray,
    query_ids: list[str],
    doc_ids: list[str],
    qrels: Qrels,
    max_k: int = 50,
    token_dim: int | None = None,
    reorder: Callable[[int, np.ndarray], np.ndarray] | None = None,
    depth: int = 0,
    discounts: Sequence[np.ndarray | None] | None = None,
) -> IRReport:
    """Score ``(Q, D)`` query vectors against ``(N, D)`` documents the way the model scores
    (:func:`~mmret.late_interaction.similarity`: inner product, or MaxSim with ``token_dim``)
    and evaluate them against ``qrels``. Queries without a relevant judgement are left out.
    ``discounts[q]``, when given and not None, is subtracted from query ``q``'s ``(N,)``
    scores (a query bank's discounts for its modality).

    ``reorder(q, ranked)``, when given, returns query row ``q``'s ranked document indices
    reordered (a reranker); the first stage then ranks at least ``depth`` documents for it.
    """
    scored = [
        i for i, qid in enumerate(query_ids) if any(r > 0 for r in qrels.get(qid, {}).values())
    ]
    if not scored:
        raise InputError("no query has a relevant document in the qrels")
    judged = [qrels[query_ids[i]] for i in scored]

    def scores(rows: list[int]) -> np.ndarray:
        sims: np.ndarray = similarity(query_vectors[rows], doc_vectors, token_dim)
        for offset, row in enumerate(rows):
            discount = discounts[row] if discounts is not None else None
            if discount is not None:
                sims[offset] -= discount
        return sims

    ranked = np.concatenate(
        [
            top_k(scores(scored[s : s + _CHUNK]), max(max_k, 10, depth))
            for s in range(0, len(scored), _CHUNK)
        ]
    )
    if reorder is not None:
        ranked = np.stack([reorder(q, row) for q, row in zip(scored, ranked, strict=True)])
    grades = gains(ranked, doc_ids, judged)
    width = max(len(j) for j in judged)
    ideal = np.zeros((len(judged), width))
    for row, grades_of in enumerate(judged):
        ideal[row, : len(grades_of)] = list(grades_of.values())
    relevant = grades[:, :max_k] > 0
    ranks = np.where(relevant.any(axis=1), relevant.argmax(axis=1) + 1, max_k + 1)
    return IRReport(
        {f"R@{k}": recall_at(grades, k) for k in KS},
        100.0 * mrr_at(grades, 10),
        100.0 * ndcg_at(grades, ideal, 10),
        len(scored),
        len(doc_ids),
        ranks,
    )
