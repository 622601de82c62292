"""Storage and search of embeddings: an SQLite item store plus pluggable vector backends.

Backends register by name in :data:`INDEXES`: ``exact`` (a matrix product), ``faiss`` (HNSW,
or IVF for very large collections) and ``ivfpq`` (compressed codes memory-mapped from disk,
re-scored exactly, for collections larger than memory) for single-vector models, ``maxsim``
(exact late interaction) and ``plaid`` (centroids and compressed tokens) for multi-vector ones.
"""

from mmret.index import exact, faiss_ann, ivfpq, maxsim, plaid
from mmret.index.base import INDEXES, VectorIndex

__all__ = ["INDEXES", "VectorIndex"]

_LOADED = (exact, faiss_ann, ivfpq, maxsim, plaid)  # imported for their registrations
