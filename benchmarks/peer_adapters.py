"""The child side of ``peers.py``: one vector database behind one small interface, serving
timed commands over stdin/stdout.

Runs under the project's environment (mmret) or ``benchmarks/peers-venv`` (every peer), so it
imports nothing but the standard library and numpy at the top, and each system's library when
that system is asked for.

    python peer_adapters.py SYSTEM SCRATCH build|cold|serve

``build`` ingests ``SCRATCH/vectors.npy`` with metadata ``{"n": i % 100, "tag": TAGS[i]}``
(``SCRATCH/tags.npy``) into ``SCRATCH/SYSTEM/`` and prints the seconds it took; ``cold``
opens that folder and answers one query, printing both times; ``serve`` opens it and answers
JSON lines ``{"mode": "single"|"batch", "filter": null|"tag"|"n", "count": m}`` with the
seconds the first ``m`` queries took and the ids found. Every system returns ids and metadata.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("LANCE_LOG", "error")  # LanceDB warns on every query about a future change
TAG = "tag3"  # tag = TAG allows 10 % of the items
N_VALUE = 7  # n = 7 allows 1 %
K = 10
INGEST_BATCH = 5_000


class System:
    name = ""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    #: The modules to import before a cold open is timed (imports are not part of it).
    modules: tuple[str, ...] = ()

    def build(self, vectors: np.ndarray, tags: list[str]) -> None:
        raise NotImplementedError

    def open(self) -> None:
        raise NotImplementedError

    def search(self, queries: np.ndarray, filter_: str | None) -> list[list[int]]:
        """Ids of the ``K`` best items of each query (a batch when several)."""
        raise NotImplementedError


class Mmret(System):
    modules = ("mmret", "mmret.engine", "mmret.index")

    def __init__(self, folder: Path, backend: str) -> None:
        super().__init__(folder)
        self.backend = backend

    def build(self, vectors: np.ndarray, tags: list[str]) -> None:
        from mmret import Item, Retriever
        from mmret.encoders.hashing import HashEncoder

        items = [
            Item(str(i), text=f"item {i}", metadata={"n": i % 100, "tag": tag})
            for i, tag in enumerate(tags)
        ]
        with Retriever.create(
            self.folder, encoder=HashEncoder(vectors.shape[1]), backend=self.backend
        ) as retriever:
            retriever.add_vectors(items, vectors)

    def open(self) -> None:
        from mmret import Retriever

        self.retriever = Retriever.open(self.folder, readonly=True)

    def search(self, queries: np.ndarray, filter_: str | None) -> list[list[int]]:
        where = {None: None, "tag": {"tag": TAG}, "n": {"n": N_VALUE}}[filter_]
        hits = self.retriever.search_vectors(queries, k=K, filter=where)
        return [[int(hit.id) for hit in row] for row in hits]


class Lance(System):
    """LanceDB with an IVF-HNSW-SQ vector index and B-tree indexes on both metadata columns."""

    modules = ("lancedb", "pyarrow")

    def build(self, vectors: np.ndarray, tags: list[str]) -> None:
        import lancedb
        import pyarrow as pa

        n, dim = vectors.shape
        table = pa.table(
            {
                "id": pa.array(np.arange(n)),
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim),
                "n": pa.array(np.arange(n) % 100),
                "tag": pa.array(tags),
            }
        )
        db = lancedb.connect(self.folder)
        created = db.create_table("items", data=table)
        created.create_index(metric="dot", index_type="IVF_HNSW_SQ")
        created.create_scalar_index("tag")
        created.create_scalar_index("n")

    def open(self) -> None:
        import lancedb

        self.table = lancedb.connect(self.folder).open_table("items")

    def search(self, queries: np.ndarray, filter_: str | None) -> list[list[int]]:
        where = {None: None, "tag": f"tag = '{TAG}'", "n": f"n = {N_VALUE}"}[filter_]
        query = self.table.search(list(queries) if len(queries) > 1 else queries[0])
        query = query.distance_type("dot").limit(K).select(["id", "n", "tag"])
        if where:
            query = query.where(where, prefilter=True)
        result = query.to_arrow()
        ids = result["id"].to_pylist()
        rows = result["query_index"].to_pylist() if "query_index" in result.column_names else None
        found: list[list[int]] = [[] for _ in range(len(queries))]
        for position, item in enumerate(ids):
            found[rows[position] if rows else 0].append(item)
        return found


class Chroma(System):
    """Chroma's persistent client (HNSW, inner product)."""

    modules = ("chromadb",)

    def build(self, vectors: np.ndarray, tags: list[str]) -> None:
        import chromadb

        client = chromadb.PersistentClient(str(self.folder))
        collection = client.create_collection("items", metadata={"hnsw:space": "ip"})
        for start in range(0, len(vectors), INGEST_BATCH):
            stop = min(start + INGEST_BATCH, len(vectors))
            collection.add(
                ids=[str(i) for i in range(start, stop)],
                embeddings=vectors[start:stop],
                metadatas=[{"n": i % 100, "tag": tags[i]} for i in range(start, stop)],
            )

    def open(self) -> None:
        import chromadb

        self.collection = chromadb.PersistentClient(str(self.folder)).get_collection("items")

    def search(self, queries: np.ndarray, filter_: str | None) -> list[list[int]]:
        where = {None: None, "tag": {"tag": TAG}, "n": {"n": N_VALUE}}[filter_]
        result = self.collection.query(
            query_embeddings=queries, n_results=K, where=where, include=["metadatas", "distances"]
        )
        return [[int(i) for i in row] for row in result["ids"]]


class Milvus(System):
    """Milvus Lite (an HNSW index; scalar fields filtered by its expression engine)."""

    modules = ("pymilvus", "milvus_lite")

    def build(self, vectors: np.ndarray, tags: list[str]) -> None:
        from pymilvus import DataType, MilvusClient

        self.folder.mkdir(parents=True)
        client = MilvusClient(str(self.folder / "milvus.db"))
        schema = client.create_schema(auto_id=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=vectors.shape[1])
        schema.add_field("n", DataType.INT64)
        schema.add_field("tag", DataType.VARCHAR, max_length=16)
        index = client.prepare_index_params()
        index.add_index("vector", index_type="HNSW", metric_type="IP")
        client.create_collection("items", schema=schema, index_params=index)
        for start in range(0, len(vectors), INGEST_BATCH):
            stop = min(start + INGEST_BATCH, len(vectors))
            rows = [
                {"id": i, "vector": vectors[i], "n": i % 100, "tag": tags[i]}
                for i in range(start, stop)
            ]
            client.insert("items", rows)
        client.flush("items")
        client.close()

    def open(self) -> None:
        from pymilvus import MilvusClient

        self.client = MilvusClient(str(self.folder / "milvus.db"))
        self.client.load_collection("items")

    def search(self, queries: np.ndarray, filter_: str | None) -> list[list[int]]:
        where = {None: "", "tag": f'tag == "{TAG}"', "n": f"n == {N_VALUE}"}[filter_]
        result = self.client.search(
            "items", data=list(queries), limit=K, filter=where, output_fields=["n", "tag"]
        )
        return [[int(hit["id"]) for hit in row] for row in result]


class Qdrant(System):
    """qdrant-client's local mode (in-process, no server)."""

    modules = ("qdrant_client", "qdrant_client.models")

    def build(self, vectors: np.ndarray, tags: list[str]) -> None:
        from qdrant_client import QdrantClient, models

        client = QdrantClient(path=str(self.folder))
        client.create_collection(
            "items",
            vectors_config=models.VectorParams(size=vectors.shape[1], distance=models.Distance.DOT),
        )
        for start in range(0, len(vectors), INGEST_BATCH):
            stop = min(start + INGEST_BATCH, len(vectors))
            client.upload_collection(
                "items",
                vectors=vectors[start:stop],
                payload=[{"n": i % 100, "tag": tags[i]} for i in range(start, stop)],
                ids=list(range(start, stop)),
            )
        client.close()

    def open(self) -> None:
        from qdrant_client import QdrantClient

        self.client = QdrantClient(path=str(self.folder))

    def search(self, queries: np.ndarray, filter_: str | None) -> list[list[int]]:
        from qdrant_client import models

        condition = None
        if filter_:
            key, value = ("tag", TAG) if filter_ == "tag" else ("n", N_VALUE)
            match = models.FieldCondition(key=key, match=models.MatchValue(value=value))
            condition = models.Filter(must=[match])
        requests = [
            models.QueryRequest(query=q.tolist(), limit=K, filter=condition, with_payload=True)
            for q in queries
        ]
        responses = self.client.query_batch_points("items", requests=requests)
        return [[int(point.id) for point in response.points] for response in responses]


SYSTEMS: dict[str, Any] = {
    "mmret-exact": lambda folder: Mmret(folder, "exact"),
    "mmret-faiss": lambda folder: Mmret(folder, "faiss"),
    "lancedb": Lance,
    "chroma": Chroma,
    "milvus-lite": Milvus,
    "qdrant-local": Qdrant,
}


def answer(system: System, queries: np.ndarray, command: dict[str, Any]) -> dict[str, Any]:
    chosen = queries[: command["count"]]
    start = time.perf_counter()
    if command["mode"] == "single":
        found = [system.search(q[None, :], command["filter"])[0] for q in chosen]
    else:
        found = system.search(chosen, command["filter"])
    return {"seconds": time.perf_counter() - start, "ids": found}


def main() -> None:
    name, scratch, action = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    folder = scratch / name
    system: System = SYSTEMS[name](folder)
    queries = np.load(scratch / "queries.npy")
    if action == "build":
        shutil.rmtree(folder, ignore_errors=True)
        vectors = np.load(scratch / "vectors.npy")
        tags = [str(t) for t in np.load(scratch / "tags.npy")]
        start = time.perf_counter()
        system.build(vectors, tags)
        print(json.dumps({"seconds": time.perf_counter() - start}))
    elif action == "cold":
        for module in system.modules:
            importlib.import_module(module)
        start = time.perf_counter()
        system.open()
        opened = time.perf_counter() - start
        system.search(queries[:1], None)
        print(json.dumps({"open": opened, "first_hits": time.perf_counter() - start}))
    else:
        system.open()
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            print(json.dumps(answer(system, queries, json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
