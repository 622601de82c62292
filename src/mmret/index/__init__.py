"""Storage and search of embeddings: an SQLite item store plus pluggable vector backends.

Backends register by name in :data:`INDEXES`. For single-vector models: ``exact`` (a matrix
product), ``faiss`` (HNSW, or IVF for very large collections), ``ivfpq`` (compressed codes
memory-mapped from disk, re-scored exactly, for collections larger than memory) and
``milvus`` (a Milvus Lite database or a Milvus server). For multi-vector ones: ``maxsim``
(exact late interaction), ``plaid`` (centroids and compressed tokens) and ``milvus`` again
(``milvus-maxsim``: tokens as Milvus rows, candidates re-scored exactly).
"""

from mmret.index import exact, faiss_ann, ivfpq, maxsim, milvus, milvus_maxsim, plaid
from mmret.index.base import INDEXES, VectorIndex

__all__ = ["INDEXES", "VectorIndex"]

# imported for their registrations
_LOADED = (exact, faiss_ann, ivfpq, maxsim, milvus, milvus_maxsim, plaid)
