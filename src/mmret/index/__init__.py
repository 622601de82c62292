"""Storage and search of embeddings: an SQLite item store plus pluggable vector backends.

Backends register by name in :data:`INDEXES`. For single-vector models: ``exact`` (a matrix
product), ``faiss`` (HNSW, or IVF for very large collections), ``ivfpq`` (compressed codes
memory-mapped from disk, re-scored exactly, for collections larger than memory) and
``milvus`` (a Milvus Lite database or a Milvus server). For multi-vector ones: ``maxsim``
(exact late interaction) and ``plaid`` (centroids and compressed tokens).
"""

from mmret.index import exact, faiss_ann, ivfpq, maxsim, milvus, plaid
from mmret.index.base import INDEXES, VectorIndex

__all__ = ["INDEXES", "VectorIndex"]

_LOADED = (exact, faiss_ann, ivfpq, maxsim, milvus, plaid)  # imported for their registrations
