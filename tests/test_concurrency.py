"""Concurrency: one writer and many readers, in threads and processes, at once.

Readers must always see a consistent snapshot (every write is all or nothing to them, and
never goes backwards); a second writer waits for the first or fails clearly.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mmret import Item, Retriever
from mmret.cli.main import app
from mmret.encoders.hashing import HashEncoder
from mmret.errors import IndexBusyError
from mmret.index.folder import IndexFolder

from .forking import exit_code, fork, pipe

DIM = 16
BATCH = 10


def new_index(folder: Path, backend: str = "exact") -> None:
    Retriever.create(folder, encoder=HashEncoder(DIM), backend=backend).close()


def batch_items(number: int) -> tuple[list[Item], np.ndarray]:
    items = [Item(f"b{number}-{j}", text="x", metadata={"batch": number}) for j in range(BATCH)]
    vectors = np.random.default_rng(number).standard_normal((BATCH, DIM)).astype(np.float32)
    return items, vectors


def visible_after(top: int) -> set[int]:
    """The batches there once batch ``top`` is in: batch 5 removes batch 0, 15 removes 10..."""
    return {b for b in range(top + 1) if not (b % 10 == 0 and b + 5 <= top)}


def write_batches(folder: Path, batches: int) -> None:
    """Add ``batches`` batches, one transaction each, removing every tenth five batches later."""
    with Retriever.open(folder, encoder=HashEncoder(DIM)) as writer:
        for number in range(batches):
            writer.add_vectors(*batch_items(number))
            if number % 10 == 5:
                writer.remove([f"b{number - 5}-{j}" for j in range(BATCH)])


def read_until(folder: Path, last_batch: int) -> bool:
    """Search in a loop until the writer's last batch shows; ``True`` if every snapshot was
    consistent (``False`` too if the last batch never showed within 5 minutes: a hang, not a
    slow machine)."""
    with Retriever.open(folder, readonly=True) as retriever:
        seen: list[int] = []
        deadline = time.monotonic() + 300
        ok = True
        while ok and time.monotonic() < deadline and not (seen and seen[-1] == last_batch):
            ok = not snapshot_problems(retriever, seen)
    return ok and seen[-1] == last_batch


def snapshot_problems(retriever: Retriever, seen: list[int]) -> list[str]:
    """Search everything once: a consistent snapshot holds whole batches, exactly those there
    after some write, and never an older state than an earlier snapshot."""
    # The filter matches everything; it makes FAISS score every candidate exactly, where an
    # approximate search for "all items" could legitimately miss a few.
    everything = {"batch": {"gte": 0}}
    hits = retriever.search_vectors(np.ones((1, DIM), np.float32), k=100_000, filter=everything)[0]
    sizes = Counter(hit.metadata["batch"] for hit in hits)
    problems = [f"batch {b} half visible ({n} items)" for b, n in sizes.items() if n != BATCH]
    top = max(sizes, default=-1)
    if sizes and set(sizes) != visible_after(top) and set(sizes) != visible_after(top) | {top - 5}:
        problems.append(f"batches {sorted(sizes)} are no state the writer went through")
    if seen and top < seen[-1]:
        problems.append(f"went back in time: batch {top} after batch {seen[-1]}")
    seen.append(top)
    return problems


@pytest.mark.parametrize("backend", ["exact", "faiss"])
def test_readers_in_threads_and_processes_see_whole_writes(tmp_path: Path, backend: str) -> None:
    folder = tmp_path / "index"
    new_index(folder, backend)
    writer = fork(write_batches, folder, 150)
    shared = Retriever.open(folder, readonly=True)
    problems: list[str] = []
    done = threading.Event()

    def read(retriever: Retriever) -> None:
        seen: list[int] = []
        while not done.is_set():
            problems.extend(snapshot_problems(retriever, seen))

    own = [Retriever.open(folder, readonly=True) for _ in range(2)]
    threads = [threading.Thread(target=read, args=(r,)) for r in [shared, shared, *own]]
    reader = fork(read_until, folder, 149)
    for thread in threads:
        thread.start()
    writer_status, reader_status = exit_code(writer), exit_code(reader)
    done.set()
    for thread in threads:
        thread.join()
    assert writer_status == 0 and reader_status == 0
    assert not problems, problems[:5]
    assert len(shared) == 150 * BATCH - 15 * BATCH
    for retriever in [shared, *own]:
        retriever.close()


def test_a_second_writer_waits_then_fails_clearly(tmp_path: Path) -> None:
    folder = tmp_path / "index"
    new_index(folder)
    with Retriever.open(folder) as first:
        started = time.monotonic()
        with pytest.raises(IndexBusyError, match=rf"another writer \(pid {os.getpid()}\)"):
            Retriever.open(folder, wait=0.3)
        assert time.monotonic() - started >= 0.3
        first.add_vectors(*batch_items(0))
        result = CliRunner().invoke(app, ["remove", str(folder), "b0-0", "--wait", "0"])
        assert result.exit_code == 1 and "another writer" in result.output
    with Retriever.open(folder, wait=0) as second:  # free again once the first closed
        assert len(second) == BATCH


def test_a_waiting_writer_gets_in_when_the_first_finishes(tmp_path: Path) -> None:
    folder = tmp_path / "index"
    new_index(folder)
    first = Retriever.open(folder)
    threading.Timer(0.3, first.close).start()
    with Retriever.open(folder, wait=10) as second:
        second.add_vectors(*batch_items(1))
        assert len(second) == BATCH


def test_a_killed_writer_leaves_no_stale_lock(tmp_path: Path) -> None:
    folder = tmp_path / "index"
    new_index(folder)
    reader, writer = pipe()
    child = fork(open_and_hold, folder, writer)
    writer.close()
    assert reader.recv_bytes() == b"open"  # the child holds the lock now, however long it took
    with pytest.raises(IndexBusyError):
        Retriever.open(folder, wait=0)
    child.kill()
    assert exit_code(child) == -signal.SIGKILL
    with Retriever.open(folder, wait=0) as writer:
        assert len(writer) == 0


def open_and_hold(folder: Path, reports: Connection) -> None:
    """Open ``folder`` for writing, say so, and hold it until killed."""
    retriever = Retriever.open(folder)
    reports.send_bytes(b"open")
    time.sleep(60)
    retriever.close()


def refuse_full_reads() -> None:
    raise AssertionError("read every vector again instead of catching up")


def forbid_full_reads(retriever: Retriever, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retriever.index.store, "vectors", refuse_full_reads)


@pytest.mark.parametrize("backend", ["exact", "faiss"])
def test_readers_and_stale_caches_catch_up_without_rereading_everything(
    tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "index"
    new_index(folder, backend)
    writer = Retriever.open(folder, encoder=HashEncoder(DIM))
    for number in range(3):
        writer.add_vectors(*batch_items(number))
    writer.flush()  # the cache now holds batches 0-2
    reader = Retriever.open(folder, readonly=True)
    forbid_full_reads(reader, monkeypatch)
    writer.add_vectors(*batch_items(3))
    writer.remove([f"b0-{j}" for j in range(BATCH)])
    query = batch_items(3)[1][:1]
    assert reader.search_vectors(query, k=1)[0][0].id == "b3-0"
    assert len(reader.search_vectors(query, k=100)[0]) == 3 * BATCH
    writer.close()
    reader.close()
    # A crash after unflushed writes leaves the cache behind; opening catches it up too.
    writer = Retriever.open(folder, encoder=HashEncoder(DIM))
    writer.add_vectors(*batch_items(4))
    writer.index.store.close()  # as if killed: no flush, no clean close
    writer.index._writer_lock.release()  # type: ignore[union-attr]
    original = IndexFolder._load_backend

    def load_without_full_reads(self: IndexFolder) -> object:
        # both backends keep a cache to catch up from
        monkeypatch.setattr(self.store, "vectors", refuse_full_reads)
        return original(self)

    monkeypatch.setattr(IndexFolder, "_load_backend", load_without_full_reads)
    with Retriever.open(folder, readonly=True) as reopened:
        ids = {hit.id for hit in reopened.search_vectors(query, k=100)[0]}
    assert ids == {f"b{n}-{j}" for n in (1, 2, 3, 4) for j in range(BATCH)}


def test_one_writer_shared_by_writing_and_searching_threads(tmp_path: Path) -> None:
    folder = tmp_path / "index"
    new_index(folder, "faiss")
    problems: list[str] = []
    with Retriever.open(folder, encoder=HashEncoder(DIM)) as shared:

        def write() -> None:
            for number in range(60):
                shared.add_vectors(*batch_items(number))
                if number % 10 == 5:
                    shared.remove([f"b{number - 5}-{j}" for j in range(BATCH)])

        def read() -> None:
            seen: list[int] = []
            while writer.is_alive():
                problems.extend(snapshot_problems(shared, seen))

        writer = threading.Thread(target=write)
        readers = [threading.Thread(target=read) for _ in range(3)]
        writer.start()
        for thread in readers:
            thread.start()
        writer.join()
        for thread in readers:
            thread.join()
        assert not problems, problems[:5]
        assert len(shared) == 60 * BATCH - 6 * BATCH


def test_threads_adding_the_same_ids_skip_instead_of_failing(tmp_path: Path) -> None:
    folder = tmp_path / "index"
    new_index(folder)
    items = [Item(f"same-{i}", text=f"text {i}") for i in range(300)]
    with Retriever.open(folder, encoder=HashEncoder(DIM)) as shared:
        reports = []
        threads = [
            threading.Thread(target=lambda: reports.append(shared.add(items))) for _ in range(3)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sum(report.added for report in reports) == 300 and len(shared) == 300
        assert sum(report.skipped.skipped for report in reports) == 600
