"""The server's encoder thread: concurrent queries batched, writes sliced between them."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from mmret.encoders.hashing import HashEncoder
from mmret.items import Query
from mmret.server.batching import EncodeBatcher


class SlowEncoder(HashEncoder):
    """A hash encoder whose every model call takes 30 ms, and that records its batches."""

    def __init__(self) -> None:
        super().__init__(16)
        self.calls: list[list[str]] = []
        self.lock = threading.Lock()

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        with self.lock:
            self.calls.append(list(texts))
        time.sleep(0.03)
        return super().embed_texts(texts)


def test_concurrent_queries_are_batched_and_answered_exactly() -> None:
    encoder = SlowEncoder()
    sizes: list[int] = []
    batcher = EncodeBatcher(encoder, max_batch=8, on_batch=lambda kind, n, s: sizes.append(n))
    texts = [f"query number {i}" for i in range(40)]
    with ThreadPoolExecutor(40) as pool:
        futures = list(pool.map(lambda t: batcher.query(Query(text=t)), texts))
        vectors = np.stack([future.result(timeout=10) for future in futures])
    batcher.close()
    expected = HashEncoder(16).encode_texts(texts)
    np.testing.assert_allclose(vectors, expected, atol=1e-6)
    assert sum(sizes) == 40 and max(sizes) == 8  # waiting queries went through together
    assert len(sizes) < 40 / 2


def test_writes_are_sliced_and_queries_go_first() -> None:
    encoder = SlowEncoder()
    batcher = EncodeBatcher(encoder, max_batch=4, write_slice=3)
    items = [Query(text=f"item {i}") for i in range(10)]
    written = batcher.items(items)
    while not encoder.calls:  # wait until the first slice is being encoded
        time.sleep(0.001)
    asked = batcher.query(Query(text="a query"))
    np.testing.assert_allclose(written.result(timeout=10), HashEncoder(16).encode(items), atol=1e-6)
    asked.result(timeout=10)
    batcher.close()
    assert [len(call) for call in encoder.calls] == [3, 1, 3, 3, 1]
    assert encoder.calls[1] == ["a query"]  # between two slices of the write
    assert batcher.items([]).result().shape == (0, 16)


def test_a_failing_query_fails_alone_and_close_refuses_new_work() -> None:
    class Picky(SlowEncoder):
        def embed_texts(self, texts: list[str]) -> torch.Tensor:
            if "bad" in texts:
                raise ValueError("cannot encode 'bad'")
            return super().embed_texts(texts)

    batcher = EncodeBatcher(Picky(), max_batch=8)
    with ThreadPoolExecutor(6) as pool:
        futures = list(pool.map(lambda t: batcher.query(Query(text=t)), ["a", "b", "bad", "c"]))
    for text, future in zip(["a", "b", "bad", "c"], futures, strict=True):
        if text == "bad":
            with pytest.raises(ValueError, match="bad"):
                future.result(timeout=10)
        else:
            assert future.result(timeout=10).shape == (16,)
    batcher.close()
    with pytest.raises(RuntimeError, match="shutting down"):
        batcher.query(Query(text="late"))


def test_a_stream_of_queries_does_not_starve_writes() -> None:
    encoder = SlowEncoder()
    batcher = EncodeBatcher(encoder, max_batch=2, write_slice=1, write_share=0.25)
    stop = threading.Event()

    def ask() -> None:
        while not stop.is_set():
            batcher.query(Query(text="query")).result(timeout=10)

    askers = [threading.Thread(target=ask) for _ in range(4)]
    for asker in askers:
        asker.start()
    while len(encoder.calls) < 3:  # queries are flowing
        time.sleep(0.001)
    written = batcher.items([Query(text=f"item {i}") for i in range(4)])
    written.result(timeout=10)
    stop.set()
    for asker in askers:
        asker.join()
    batcher.close()
    kinds = ["item" if call[0].startswith("item") else "query" for call in encoder.calls]
    first, last = kinds.index("item"), len(kinds) - 1 - kinds[::-1].index("item")
    between = kinds[first : last + 1]
    assert between.count("item") == 4
    # each slice took as long as a query batch: about three batches of queries between slices
    assert 1 <= between.count("query") / 3 <= 4
