"""Storage and search of embeddings: an SQLite item store plus pluggable vector backends.

Backends register by name in :data:`INDEXES`: ``exact`` (a matrix product) and ``faiss``
(HNSW, or IVF for very large collections).
"""

from mmret.index import exact, faiss_ann
from mmret.index.base import INDEXES, VectorIndex

__all__ = ["INDEXES", "VectorIndex"]

_LOADED = (exact, faiss_ann)  # imported for their registrations
