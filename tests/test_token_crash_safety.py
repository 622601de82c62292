"""The kill test for the token features kept beside an index for reranking.

As in ``test_crash_safety``: a child applies a fixed sequence of writes (adds of 20 items with
their token features, removals of 10) to an index that stores token features, and is killed
with SIGKILL at random points. After every kill the index must hold the state before or after
the write under way, ``check_index`` (which verifies every item's token rows, ranges and
digests) must find nothing wrong, the stored features must be exactly those of the items, and
a reranked search must work. ``MMRET_KILL_POINTS`` sets the number of kills (default 15).
"""

from __future__ import annotations

import os
import random
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from mmret import Item, Query, Retriever
from mmret.maintenance.integrity import check_index

from .forking import reports_until_killed
from .rerank_fixtures import LayerHashEncoder, tiny_reranker, tiny_spec
from .test_crash_safety import operation, state_after, stored_ids

KILL_POINTS = int(os.environ.get("MMRET_KILL_POINTS", "15"))


def item(item_id: str) -> Item:
    return Item(item_id, text=f"word{item_id.replace('-', ' word')}", metadata={"n": 1})


def run_writer(folder: Path, start: int, reports: Connection) -> None:
    encoder = LayerHashEncoder(16)
    retriever = Retriever.open(folder, encoder=encoder)
    for number in range(start, 10**9):
        kind, batch = operation(number)
        if kind == "add":
            items = [item(i) for i in batch]
            retriever.add_vectors(items, encoder.encode(items))
        else:
            retriever.remove(batch)
        reports.send_bytes(str(number + 1).encode())


def kill_once(folder: Path, start: int, delay: float) -> int:
    reports = reports_until_killed(run_writer, folder, start, delay=delay)
    return int(reports[-1]) if reports else start


def test_kill_minus_nine_never_breaks_the_token_features(tmp_path: Path) -> None:
    folder = tmp_path / "index"
    encoder = LayerHashEncoder(16)
    Retriever.create(folder, encoder=encoder, token_features=tiny_spec(encoder)).close()
    reranker = tiny_reranker(encoder)
    rng = random.Random(12)
    done = 0
    for _ in range(KILL_POINTS):
        reported = kill_once(folder, done, rng.uniform(0.02, 0.3))
        report = check_index(folder)
        assert report.ok, report.problems
        ids = stored_ids(folder)
        matches = [n for n in (reported, reported + 1) if state_after(n) == ids]
        assert matches, f"after {reported} reported writes the index holds an unexpected state"
        done = matches[-1]
        if not ids:
            continue
        with Retriever.open(folder, encoder=encoder, readonly=True) as retriever:
            chosen = rng.sample(sorted(ids), min(3, len(ids)))
            stored = retriever.index.tokens  # the features on disk are exactly the items'
            refs = retriever.index.store.token_refs()
            keys = {
                hit.id: key
                for key, hit in retriever.index.search(
                    encoder.encode([item(i) for i in chosen]), 10**6, None
                )[0][0]
            }
            assert stored is not None
            for item_id in chosen:
                want = reranker.features([item(item_id)]).text[0].half().numpy()
                got = stored.read([refs[keys[item_id]]]).text[0].numpy()
                np.testing.assert_array_equal(got, want.astype(np.float32))
            hits = retriever.search([Query(text="word1")], k=5, rerank=5, reranker=reranker)
            assert len(hits[0]) == min(5, len(ids))
    assert done >= KILL_POINTS // 2, f"only {done} writes in {KILL_POINTS} runs"
