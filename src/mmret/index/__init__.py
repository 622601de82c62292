"""Storage and search of embeddings: an SQLite item store plus pluggable vector backends.

Backends register by name in :data:`INDEXES`: ``exact`` (a matrix product) and ``faiss``
(HNSW, or IVF for very large collections) for single-vector models, ``maxsim`` (exact late
interaction) for multi-vector ones.
"""

from mmret.index import exact, faiss_ann, maxsim
from mmret.index.base import INDEXES, VectorIndex

__all__ = ["INDEXES", "VectorIndex"]

_LOADED = (exact, faiss_ann, maxsim)  # imported for their registrations
