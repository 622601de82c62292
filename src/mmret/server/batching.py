"""One thread runs every encoding of a server: concurrent queries are encoded together.

A model call on a CPU costs nearly as much for one short text as for several (Python and
framework overhead dominate), so queries that arrive while the encoder is busy wait for it
and then go through as one batch: no timer, no added delay for a lone query. Items being
added are encoded a slice at a time between query batches, so an upload of many photos does
not hold searches up for seconds; while queries wait, writes get ``write_share`` of the
encoder's time (a slice runs once the query batches since the last slice took
``(1 / write_share - 1)`` times as long as that slice), so a steady stream of queries can
neither starve writes nor be starved by them. Keeping all encoding on one thread also keeps
tokenizers, which are not safe to call from several threads at once, on one thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from mmret.encoders.base import Content, Encoder


@dataclass
class _Query:
    content: Content
    future: Future[np.ndarray]


@dataclass
class _Write:
    contents: Sequence[Content]
    future: Future[np.ndarray]
    done: list[np.ndarray] = field(default_factory=list)
    position: int = 0


class EncodeBatcher:
    """Encodes queries (batched, first) and items to add (in slices, when no query waits).

    Items are encoded with ``encoder`` and queries with ``query_encoder`` (default the same;
    a ReT index's query side differs: :attr:`mmret.Retriever.query_encoder`).
    ``on_batch(kind, size, seconds)`` is told about every model call (for metrics).
    """

    def __init__(
        self,
        encoder: Encoder,
        *,
        query_encoder: Encoder | None = None,
        max_batch: int = 32,
        write_slice: int = 1,
        write_share: float = 0.2,
        on_batch: Callable[[str, int, float], None] | None = None,
    ) -> None:
        self._encoder = encoder
        self._query_encoder = query_encoder or encoder
        self._max_batch = max_batch
        self._write_slice = write_slice
        self._write_share = write_share
        self._write_due = 0.0  # when (perf_counter) a write slice may next cut in before queries
        self._on_batch = on_batch
        self._queries: deque[_Query] = deque()
        self._writes: deque[_Write] = deque()
        self._ready = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="mmret-encoder", daemon=True)
        self._thread.start()

    def query(self, content: Content) -> Future[np.ndarray]:
        """A future ``(dim,)`` unit vector of one query."""
        job = _Query(content, Future())
        self._submit(lambda: self._queries.append(job))
        return job.future

    def items(self, contents: Sequence[Content]) -> Future[np.ndarray]:
        """A future ``(N, dim)`` matrix of unit vectors of items to add."""
        job = _Write(contents, Future())
        if not contents:
            job.future.set_result(np.zeros((0, self._encoder.dim), dtype=np.float32))
            return job.future
        self._submit(lambda: self._writes.append(job))
        return job.future

    def close(self) -> None:
        """Finish what is queued, then stop the thread."""
        with self._ready:
            self._stopping = True
            self._ready.notify()
        self._thread.join()

    def _submit(self, enqueue: Callable[[], None]) -> None:
        with self._ready:
            if self._stopping:
                raise RuntimeError("the encoder is shutting down")
            enqueue()
            self._ready.notify()

    def _run(self) -> None:
        while True:
            with self._ready:
                while not (self._queries or self._writes or self._stopping):
                    self._ready.wait()
                if not (self._queries or self._writes):
                    return  # stopping, and nothing left
                write = self._writes[0] if self._writes else None
                if write is not None and self._queries and time.perf_counter() < self._write_due:
                    write = None  # queries first: writes had their share of late
                batch = []
                if write is None:
                    count = min(self._max_batch, len(self._queries))
                    batch = [self._queries.popleft() for _ in range(count)]
            if write is not None:
                started = time.perf_counter()
                self._encode_write_slice(write)
                took = time.perf_counter() - started
                self._write_due = started + took / self._write_share
            else:
                self._encode_queries(batch)

    def _timed(self, kind: str, contents: Sequence[Content]) -> np.ndarray:
        started = time.perf_counter()
        encoder = self._query_encoder if kind == "query" else self._encoder
        vectors = encoder.encode(contents)
        if self._on_batch is not None:
            self._on_batch(kind, len(contents), time.perf_counter() - started)
        return vectors

    def _encode_queries(self, batch: list[_Query]) -> None:
        try:
            vectors = self._timed("query", [job.content for job in batch])
        except Exception as error:  # one bad query must not fail the others
            if len(batch) == 1:
                batch[0].future.set_exception(error)
                return
            for job in batch:
                self._encode_queries([job])
            return
        for job, vector in zip(batch, vectors, strict=True):
            job.future.set_result(vector)

    def _encode_write_slice(self, write: _Write) -> None:
        end = write.position + self._write_slice
        try:
            write.done.append(self._timed("item", write.contents[write.position : end]))
        except Exception as error:  # reported to the request that sent it
            self._finish(write)
            write.future.set_exception(error)
            return
        write.position = end
        if write.position >= len(write.contents):
            self._finish(write)
            write.future.set_result(np.concatenate(write.done))

    def _finish(self, write: _Write) -> None:
        with self._ready:
            self._writes.remove(write)
