"""Late interaction (ColBERT's MaxSim): how multi-vector embeddings are stored and scored.

A multi-vector encoder (ReT) embeds each input as ``T`` unit tokens of ``token_dim``
dimensions. Everywhere a single-vector model passes an ``(N, dim)`` matrix, a multi-vector
model passes the same shape with each row its tokens flattened: ``dim = T * token_dim``. So the
item store, the backends' add/remove, the caches and the kill test need nothing new; only
scoring does. Every token counts (encoders emit a fixed ``T``; there is no padding).

The score of a query against a document is, for each query token, the best inner product with
any document token, summed over the query tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from mmret.errors import InputError

if TYPE_CHECKING:  # the index scores with numpy alone; only training passes tensors
    import torch

#: Scoring works through the documents in blocks of about this many float32 similarities.
_BLOCK_FLOATS = 16_000_000


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation of ``(N, D)``; all-zero rows stay zero instead of becoming NaN."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit: np.ndarray = (vectors / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)
    return unit


def as_tokens(vectors: np.ndarray, token_dim: int) -> np.ndarray:
    """``(N, T * token_dim)`` flattened token sets as an ``(N, T, token_dim)`` view."""
    if vectors.ndim != 2 or token_dim < 1 or vectors.shape[1] % token_dim:
        raise InputError(
            f"multi-vector rows of shape {vectors.shape} are not whole tokens of {token_dim}"
        )
    return vectors.reshape(len(vectors), vectors.shape[1] // token_dim, token_dim)


def maxsim(queries: np.ndarray, documents: np.ndarray, token_dim: int) -> np.ndarray:
    """``(Q, N)`` late-interaction scores of flattened ``(Q, Tq * d)`` queries against
    flattened ``(N, Td * d)`` documents (the two token counts may differ).

    One matrix product per block of documents: all query tokens against all the block's
    tokens, then the best document token per query token, summed.

    >>> q = np.array([[1.0, 0.0, 0.0, 1.0]])            # two tokens: e1, e2
    >>> d = np.array([[1.0, 0.0, 0.6, 0.8], [0.0, 1.0, 0.0, 1.0]])
    >>> print(maxsim(q, d, 2))                            # 1 + 0.8, 0 + 1
    [[1.8 1. ]]
    """
    query_tokens = as_tokens(np.asarray(queries, dtype=np.float32), token_dim)
    doc_tokens = as_tokens(np.asarray(documents, dtype=np.float32), token_dim)
    n_queries, per_query, _ = query_tokens.shape
    n_docs, per_doc, _ = doc_tokens.shape
    flat_queries = query_tokens.reshape(n_queries * per_query, token_dim)
    scores = np.empty((n_queries, n_docs), dtype=np.float32)
    block = max(1, _BLOCK_FLOATS // max(1, n_queries * per_query * per_doc))
    for start in range(0, n_docs, block):
        part = doc_tokens[start : start + block]
        sims = flat_queries @ part.reshape(-1, token_dim).T  # (Q * Tq, B * Td)
        best = sims.reshape(n_queries, per_query, len(part), per_doc).max(axis=3)
        scores[:, start : start + len(part)] = best.sum(axis=1)
    return scores


def similarity(queries: np.ndarray, documents: np.ndarray, token_dim: int | None) -> np.ndarray:
    """``(Q, N)`` scores the way a model scores: inner products for single-vector models
    (``token_dim`` ``None``), MaxSim for multi-vector ones."""
    if token_dim is None:
        product: np.ndarray = queries @ documents.T
        return product
    return maxsim(queries, documents, token_dim)


def maxsim_tensors(queries: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
    """``(Q, N)`` MaxSim of ``(Q, Tq, d)`` query tokens against ``(N, Td, d)`` document tokens,
    differentiable: the form training needs (it equals :func:`maxsim` on the flattened rows).

    >>> import torch
    >>> q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    >>> d = torch.tensor([[[1.0, 0.0], [0.6, 0.8]], [[0.0, 1.0], [0.0, 1.0]]])
    >>> maxsim_tensors(q, d).tolist()
    [[1.7999999523162842, 1.0]]
    """
    sims = queries[:, None] @ documents.transpose(1, 2)[None]  # (Q, N, Tq, Td)
    scores: torch.Tensor = sims.amax(dim=3).sum(dim=2)
    return scores


def normalise_tokens(vectors: np.ndarray, token_dim: int | None) -> np.ndarray:
    """``(N, dim)`` rows made unit the way a model's embeddings are: each row for single-vector
    models (``token_dim`` ``None``), each of its tokens for multi-vector ones. All-zero rows or
    tokens stay zero."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if token_dim is None:
        return l2_normalise(vectors)
    return l2_normalise(as_tokens(vectors, token_dim).reshape(-1, token_dim)).reshape(vectors.shape)
