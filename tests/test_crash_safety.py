"""Crash safety: a writer killed with SIGKILL at random points never leaves a broken index.

A child process applies a fixed sequence of writes (adds of 20 items, removals of 10) and
reports each one once it returns; the parent kills it after a random delay, reopens the index
and checks that it holds exactly the state before or after the write that was under way, that
``check_index`` finds nothing wrong, and that search finds what is stored. Then a new writer
carries on from there. ``MMRET_KILL_POINTS`` sets how many kills per backend (default 100, so
200 in all).
"""

from __future__ import annotations

import os
import random
import sqlite3
import time
import zlib
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import pytest

from mmret import Item, Retriever
from mmret.encoders import Encoder, load_encoder
from mmret.encoders.hashing import HashEncoder, TokenHashEncoder
from mmret.index.manifest import ITEMS_FILE, read_manifest
from mmret.maintenance.integrity import check_index

from .forking import exit_code, fork, reports_until_killed

DIM = 16
BATCH = 20
KILL_POINTS = int(os.environ.get("MMRET_KILL_POINTS", "100"))
#: Milvus Lite takes about 0.4 s to open in each writer: fewer kills keep its runs ~15 s.
MILVUS_KILL_POINTS = int(os.environ.get("MMRET_KILL_POINTS", "30"))
BACKENDS: dict[str, dict[str, object]] = {
    "exact": {},
    "faiss": {"exact_below": 0, "hnsw_m": 8},
    # Trained from 256 items (the least its codebooks take), so kills land while it trains,
    # writes its memory-mapped codes and deletes from its lists. It retrains with more lists
    # as it grows (128 past 16,000 items, which an idle machine writes in one run): every
    # list is probed and every candidate re-scored, so a search for everything finds it all.
    "ivfpq": {
        "train_from": 256,
        "pq": 4,
        "exact_below": 0,
        "nprobe": 1_000_000,
        "rescore": 1_000_000,
    },
    "maxsim": {},
    # Clustered from 64 documents on, and searched through its stages whatever the size, so
    # kills land while it trains, compresses and rewrites its cache. Its 4 centroids (from 64
    # documents) would prune the later thousands poorly: every document is kept to the end
    # (an idle machine writes over 10,000 in one run), and its tokens are kept as float16
    # (SQfp16), so its own vector finds each with its full score (SQ8 clips residuals beyond
    # the range of its 64 training documents: a self-score fell to 3.59 of 4).
    "plaid": {
        "train_from": 64,
        "codec": "SQfp16",
        "exact_below": 0,
        "candidates": 1_000_000,
        "rescore": 1_000_000,
    },
}
try:  # an optional extra: pip install 'mmret[milvus]'
    import pymilvus  # noqa: F401

    BACKENDS |= {"milvus": {}, "milvus-maxsim": {}}
except ImportError:
    pass
MULTI_VECTOR = {"maxsim", "plaid", "milvus-maxsim"}
#: Multi-vector backends index sets of this many tokens of DIM dimensions.
TOKENS = 4
#: Seconds a writer may take to open the index and finish its first write: far beyond what a
#: loaded machine needs, so that a writer that hangs fails the test instead of stalling it.
FIRST_WRITE_WITHIN = 120


def encoder_for(backend: str) -> Encoder:
    return TokenHashEncoder(TOKENS, DIM) if backend in MULTI_VECTOR else HashEncoder(DIM)


def index_encoder(folder: Path) -> Encoder:
    return load_encoder(read_manifest(folder).encoder)


def vector(item_id: str, encoder: Encoder) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(item_id.encode()))
    return rng.standard_normal(encoder.dim)


def self_score(folder: Path, encoder: Encoder) -> float:
    """The least score a stored vector gets as its own query: 1, or one per token under
    MaxSim, less a margin for rounding (and for plaid's compressed tokens)."""
    tokens = encoder.dim // (encoder.token_dim or encoder.dim)
    return (0.9 if read_manifest(folder).backend == "plaid" else 0.999) * tokens


def operation(number: int) -> tuple[str, list[str]]:
    """Write ``number`` of the fixed sequence: every fourth removes half of an earlier add."""
    if number % 4 == 3:
        return "remove", [f"{number - 3}-{j}" for j in range(BATCH // 2)]
    return "add", [f"{number}-{j}" for j in range(BATCH)]


def state_after(n_operations: int) -> set[str]:
    ids: set[str] = set()
    for number in range(n_operations):
        kind, batch = operation(number)
        ids = ids | set(batch) if kind == "add" else ids - set(batch)
    return ids


def stored_ids(folder: Path) -> set[str]:
    db = sqlite3.connect(f"file:{folder / ITEMS_FILE}?mode=ro", uri=True)
    try:
        return {row[0] for row in db.execute("SELECT id FROM items")}
    finally:
        db.close()


def run_writer(folder: Path, start: int, reports: Connection) -> None:
    """The child: apply writes from ``start`` on, forever, reporting each number once done."""
    encoder = index_encoder(folder)
    retriever = Retriever.open(folder, encoder=encoder)
    for number in range(start, 10**9):
        kind, batch = operation(number)
        if kind == "add":
            items = [Item(item_id, text=item_id, metadata={"n": number}) for item_id in batch]
            retriever.add_vectors(items, np.stack([vector(i, encoder) for i in batch]))
        else:
            retriever.remove(batch)
        if number % 3 == 2:
            retriever.flush()  # rewrite the FAISS cache now and then: kills land there too
        reports.send_bytes(str(number + 1).encode())


def kill_writer_once(folder: Path, start: int, delay: float, after_a_write: bool) -> int:
    """Start a writer at operation ``start``, SIGKILL it ``delay`` seconds later (counted from
    its first finished write when ``after_a_write``, else from its start); returns how many
    operations it reported done (``start`` if none)."""
    reports = reports_until_killed(
        run_writer,
        folder,
        start,
        delay=delay,
        after_first_report=after_a_write,
        first_report_within=FIRST_WRITE_WITHIN,
    )
    return int(reports[-1]) if reports else start


def verify(folder: Path, done: int, rng: random.Random) -> int:
    """The index holds the state after ``done`` or ``done + 1`` writes; returns which."""
    report = check_index(folder)
    assert report.ok, report.problems
    ids = stored_ids(folder)
    matches = [n for n in (done, done + 1) if state_after(n) == ids]
    assert matches, f"after {done} reported writes the index holds an unexpected state"
    encoder = index_encoder(folder)
    everyone = np.ones((1, encoder.dim), np.float32)
    with Retriever.open(folder, readonly=True) as retriever:
        assert len(retriever) == len(ids)
        # Everything the backend holds (a filter matching all makes FAISS score exactly too)
        # is what the store holds: no lost additions, no removed items coming back.
        everything = retriever.search_vectors(everyone, k=10**6, filter={"n": {"gte": 0}})[0]
        assert {hit.id for hit in everything} == ids
        # Filters read metadata columns that catch up across reopenings and kills: a set of
        # batch numbers finds exactly the items of those batches still stored.
        batches = rng.sample(range(done + 2), min(3, done + 2))
        chosen = retriever.search_vectors(everyone, k=10**6, filter={"n": batches})[0]
        assert {hit.id for hit in chosen} == {i for i in ids if int(i.split("-")[0]) in batches}
        for item_id in rng.sample(sorted(ids), min(3, len(ids))):
            hits = retriever.search_vectors(vector(item_id, encoder)[None, :], k=1)[0]
            assert hits[0].id == item_id and hits[0].score > self_score(folder, encoder)
    return matches[-1]


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_kill_minus_nine_at_random_points_never_breaks_the_index(
    tmp_path: Path, backend: str
) -> None:
    folder = tmp_path / "index"
    Retriever.create(
        folder, encoder=encoder_for(backend), backend=backend, backend_options=BACKENDS[backend]
    ).close()
    rng = random.Random(backend)
    done = 0
    points = MILVUS_KILL_POINTS if backend.startswith("milvus") else KILL_POINTS
    for attempt in range(points):
        # Every other kill is timed from the writer's first write, so that kills land among
        # the writes however slowly a loaded machine starts the writers; the others may also
        # land while a writer opens the index.
        after_a_write = attempt % 2 == 1
        reported = kill_writer_once(folder, done, rng.uniform(0.0, 0.08), after_a_write)
        done = verify(folder, reported, rng)
    assert done >= points // 2, f"only {done} writes in {points} runs"


def create_empty(folder: Path) -> None:
    Retriever.create(folder, encoder=HashEncoder(DIM)).close()


def test_kill_during_create_leaves_nothing_or_a_whole_index(tmp_path: Path) -> None:
    rng = random.Random(7)
    for attempt in range(30):
        folder = tmp_path / f"index-{attempt}"
        child = fork(create_empty, folder)
        time.sleep(rng.uniform(0.0, 0.02))
        child.kill()  # SIGKILL
        exit_code(child)
        if folder.exists():
            assert check_index(folder).ok
            with Retriever.open(folder, encoder=HashEncoder(DIM)) as retriever:
                assert len(retriever) == 0
        else:
            # The next create succeeds and sweeps away what the dead one left.
            create_empty(folder)
            assert not list(tmp_path.glob(f".{folder.name}.building-*"))
