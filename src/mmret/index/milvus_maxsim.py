"""Late interaction on Milvus: token vectors stored as rows, candidates found by token search,
then re-scored by exact MaxSim in mmret.

A multi-vector model's item is ``T`` unit tokens of ``token_dim`` (see
:mod:`mmret.late_interaction`). Here each token is a row of the collection, ``(row, key,
vector)`` with ``row = key * T + position``, so Milvus (Lite, a standalone server or a cluster,
with whatever index it builds over the tokens) does what it is good at, nearest-neighbour
search over many vectors, and mmret does the rest, as ColBERT's first stage does:

1. **token search**: each of a query's tokens finds its ``token_k`` nearest stored tokens (one
   batched Milvus search; a metadata filter becomes a ``key in [...]`` expression);
2. **exact MaxSim**: the union of the items those tokens belong to is scored by
   :func:`mmret.late_interaction.maxsim` on their full-precision token sets, read from the item
   store (:meth:`VectorIndex.use_stored_vectors`) or, for a bare index, from Milvus, and the
   best ``k`` returned. Scores are exact; only an item none of whose tokens is among any query
   token's ``token_k`` nearest can be missed.

A filter allowing at most ``exact_below`` items skips the token search: those items are scored
directly (exact). Adding, removal, persistence, catching up and rebuilding are
:class:`MilvusIndex`'s. ``backend="milvus"`` picks this class for a multi-vector model.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mmret.errors import InputError
from mmret.index.base import INDEXES, VectorSource, top_k
from mmret.index.milvus import _KEY_BATCH, _MAX_LIMIT, MilvusIndex
from mmret.late_interaction import as_tokens, maxsim


@INDEXES.register("milvus-maxsim")
class MilvusMaxSimIndex(MilvusIndex):
    """Approximate-candidate, exact-score MaxSim over ``(N, dim)`` rows of ``dim // token_dim``
    tokens, the tokens held in Milvus.

    Options: those of :class:`MilvusIndex` (``uri``, ``index_type``, ``index_params``,
    ``search_params``: they apply to the token rows), ``token_k`` (stored tokens each query
    token finds; their items are re-scored exactly) and ``exact_below`` (a filter allowing at
    most this many items scores them directly). ``token_dim`` ``None`` reads each row as one
    token (it lets code that only lists cache files build one without a manifest).
    """

    name = "milvus-maxsim"
    multi_vector = True

    def __init__(
        self,
        dim: int,
        token_dim: int | None = None,
        token_k: int = 128,
        exact_below: int = 2_000,
        **options: Any,
    ) -> None:
        token_dim = dim if token_dim is None else token_dim
        if token_dim < 1 or dim % token_dim:
            raise InputError(f"token_dim {token_dim} does not divide the dimension {dim}")
        if not 1 <= token_k <= _MAX_LIMIT:
            raise InputError(f"token_k must be in [1, {_MAX_LIMIT}], got {token_k}")
        super().__init__(dim, **options)
        self.token_dim, self.tokens = token_dim, dim // token_dim
        self.token_k, self.exact_below = token_k, exact_below
        self._stored: VectorSource | None = None

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "token_dim": self.token_dim,
            "token_k": self.token_k,
            "exact_below": self.exact_below,
        }

    def use_stored_vectors(self, source: VectorSource) -> None:
        self._stored = source

    def _add_fields(self, schema: Any, types: Any) -> None:
        """One ``(row, key, vector)`` row per token: ``row = key * T + position``."""
        schema.add_field("row", types.INT64, is_primary=True)
        schema.add_field("key", types.INT64)
        schema.add_field("vector", types.FLOAT_VECTOR, dim=self.token_dim)

    @property
    def _rows_per_item(self) -> int:
        return self.tokens

    def _rows(self, keys: np.ndarray, vectors: np.ndarray) -> list[dict[str, Any]]:
        tokens = as_tokens(vectors, self.token_dim).tolist()
        return [
            {"row": key * self.tokens + position, "key": key, "vector": token}
            for key, token_set in zip(keys.tolist(), tokens, strict=True)
            for position, token in enumerate(token_set)
        ]

    def _search(
        self,
        queries: np.ndarray,
        k: int,
        allowed: np.ndarray | None,
        empty: tuple[np.ndarray, np.ndarray],
    ) -> tuple[np.ndarray, np.ndarray]:
        where = ""
        if allowed is not None:
            if len(allowed) <= self.exact_below:
                return top_k(*self._maxsim(queries, allowed), k)
            where = f"key in {allowed.tolist()}"
        candidates = self._candidates(queries, where, k)
        scores, found = empty[0].copy(), empty[1].copy()
        for row, keys in enumerate(candidates):
            if len(keys):
                best = top_k(*self._maxsim(queries[row : row + 1], keys), k)
                scores[row], found[row] = best[0][0], best[1][0]
        return scores, found

    def _candidates(self, queries: np.ndarray, where: str, k: int) -> list[np.ndarray]:
        """For each of ``(Q, dim)`` queries, the sorted keys of the items owning one of the
        ``token_k`` (at least ``k``) stored tokens nearest to one of its tokens (stage 1)."""
        tokens = as_tokens(queries, self.token_dim)
        per_query = tokens.shape[1]
        hits = self._db.search(
            self._collection,
            data=tokens.reshape(-1, self.token_dim).tolist(),
            limit=min(max(self.token_k, k), _MAX_LIMIT, self._count * self.tokens),
            filter=where,
            output_fields=["key"],
            search_params={"metric_type": "IP", "params": self.search_params},
        )
        found = []
        for row in range(len(queries)):
            keys = {
                hit["entity"]["key"]
                for token_hits in hits[row * per_query : (row + 1) * per_query]
                for hit in token_hits
            }
            keys_array = np.asarray(sorted(keys), dtype=np.int64)
            found.append(keys_array[keys_array <= self._last])
        return found

    def _maxsim(self, queries: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(Q, M)`` exact MaxSim of ``queries`` against the items of sorted ``(M,)`` keys
        that are present, and those keys."""
        keys, vectors = self._vectors(keys)
        return maxsim(queries, vectors, self.token_dim), keys

    def _vectors(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ``(M,)`` keys of those of ``keys`` that are present and their ``(M, dim)``
        full-precision token sets: from the item store when the index has one (every key
        asked for is there), else reassembled from Milvus's rows."""
        if self._stored is not None:
            return keys, self._stored(keys)
        out = np.zeros((len(keys), self.tokens, self.token_dim), dtype=np.float32)
        seen = np.zeros(len(keys), dtype=bool)
        where = {int(key): i for i, key in enumerate(keys.tolist())}
        for start in range(0, len(keys), _KEY_BATCH):
            wanted = keys[start : start + _KEY_BATCH].tolist()
            rows = self._db.query(
                self._collection, filter=f"key in {wanted}", output_fields=["row", "vector"]
            )
            for row in rows:
                key, position = divmod(int(row["row"]), self.tokens)
                out[where[key], position] = row["vector"]
                seen[where[key]] = True
        return keys[seen], out[seen].reshape(-1, self.dim)
