"""Exact late-interaction search: MaxSim of every query against every stored token set.

The storage, cache, removal and filtered search are :class:`~mmret.index.exact.ExactIndex`'s:
rows are flattened token sets (``(N, T * token_dim)``, see :mod:`mmret.late_interaction`), so
only the scoring differs. It is the reference the approximate multi-vector backend is measured
against, and what ``backend="auto"`` uses for multi-vector models.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mmret.errors import InputError
from mmret.index.base import INDEXES
from mmret.index.exact import ExactIndex
from mmret.late_interaction import maxsim


@INDEXES.register("maxsim")
class MaxSimIndex(ExactIndex):
    """Brute-force MaxSim over ``(N, dim)`` rows of ``dim // token_dim`` tokens each.

    ``token_dim`` ``None`` reads each row as one token (MaxSim is then the inner product);
    it lets code that only lists a backend's cache files build one without a manifest.
    """

    name = "maxsim"
    multi_vector = True

    def __init__(self, dim: int, token_dim: int | None = None) -> None:
        token_dim = dim if token_dim is None else token_dim
        if token_dim < 1 or dim % token_dim:
            raise InputError(f"token_dim {token_dim} does not divide the dimension {dim}")
        super().__init__(dim)
        self.token_dim = token_dim

    def config(self) -> dict[str, Any]:
        return {"token_dim": self.token_dim}

    def score(self, queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """``(Q, N)`` MaxSim scores: per query token the best stored token, summed."""
        return maxsim(queries, vectors, self.token_dim)
