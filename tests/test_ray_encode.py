"""Distributed encoding on Ray Data: the same index as one process, resumable, clear errors.

One local Ray cluster (``ray.init(num_cpus=2)``) serves the whole module: starting one takes
several seconds. Skipped when Ray is not installed (``pip install 'mmret[ray]'``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mmret import InputError, Retriever, read_items
from mmret.maintenance.integrity import check_index
from mmret.scaleout.ray_encode import add_with_ray, check_reachable
from mmret.scaleout.shards import plan_shards, shard_path

from .cli import run
from .conftest import solid

ray = pytest.importorskip("ray")

SHARD = 256


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A local two-CPU Ray cluster for the module; yields its address."""
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=200 << 20,
        logging_level="WARNING",
    )
    try:
        yield str(ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A JSONL manifest of 700 items (three shards of 256): images, texts, image+text pairs,
    one image that does not decode and one row that is not valid."""
    folder = tmp_path_factory.mktemp("source")
    (folder / "images").mkdir()
    rows: list[object] = []
    for number in range(700):
        row: dict[str, object] = {"id": f"item-{number}", "n": number, "even": number % 2 == 0}
        if number % 3:
            colour = (number * 37 % 256, number * 91 % 256, number * 13 % 256)
            solid(colour, (16, 12)).save(folder / "images" / f"{number}.png")
            row["image"] = f"images/{number}.png"
        if number % 3 != 1:
            row["text"] = f"a photo number {number} of colour {number % 11}"
        rows.append(row)
    (folder / "images" / "broken.png").write_bytes(b"not a png")
    rows.insert(300, {"id": "broken", "image": "images/broken.png"})
    rows.insert(10, {"image": "images/1.png"})  # no id
    (folder / "items.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder / "items.jsonl"


def single_process(source: Path, folder: Path, model: str) -> Retriever:
    retriever = Retriever.create(folder, model=model)
    retriever.add(read_items(source))
    return retriever


def assert_same_index(ours: Retriever, reference: Retriever) -> None:
    """Same ids in the same order, same stored rows, bit-identical vectors."""
    ids = reference.ids()
    assert ours.ids() == ids
    assert ours.get(ids) == reference.get(ids)
    theirs, mine = reference.stored_vectors(ids), ours.stored_vectors(ids)
    assert all(np.array_equal(mine[i], theirs[i]) for i in ids)


@pytest.mark.parametrize("model", ["hash:32", "hash-tokens:4x8"])
def test_ray_run_gives_the_single_process_index(
    cluster: str, source: Path, tmp_path: Path, model: str
) -> None:
    with (
        single_process(source, tmp_path / "one.mmret", model) as reference,
        Retriever.create(tmp_path / "ray.mmret", model=model) as ours,
    ):
        report = add_with_ray(ours, source, shard_size=SHARD, workers=2)
        assert report.shards == 3 and sorted(report.encoded) == [0, 1, 2]
        assert report.workers == 2 and report.reused == []
        assert report.added == len(reference) == 700  # not the undecodable image
        assert report.skipped.skipped == 2  # it and the row without an id
        assert any(r.startswith("broken: ") for r in report.skipped.reasons)
        assert_same_index(ours, reference)
        query = ["a photo number 12"]
        assert ours.search(query, k=3) == reference.search(query, k=3)
    assert not (tmp_path / "ray.mmret.ray-shards").exists()  # loaded, then deleted
    assert check_index(tmp_path / "ray.mmret").ok


def test_a_folder_source_with_captions_and_subfolders(
    cluster: str, photo_folder: Path, tmp_path: Path
) -> None:
    with (
        single_process(photo_folder, tmp_path / "one.mmret", "hash:32") as reference,
        Retriever.create(tmp_path / "ray.mmret", model="hash:32") as ours,
    ):
        assert add_with_ray(ours, photo_folder, shard_size=SHARD).added == 5
        assert_same_index(ours, reference)
        assert ours.get(["more/grey"])["more/grey"].metadata == {"folder": "more"}


def test_interrupted_run_resumes_from_its_finished_shards(
    cluster: str, source: Path, tmp_path: Path
) -> None:
    staging = tmp_path / "shards"

    def stop_after_two(number: int) -> None:
        if len(list(staging.glob("shard-*.parquet"))) == 2:
            raise KeyboardInterrupt

    with Retriever.create(tmp_path / "ray.mmret", model="hash:32") as ours:
        with pytest.raises(KeyboardInterrupt):
            add_with_ray(ours, source, shard_size=SHARD, staging=staging, on_shard=stop_after_two)
        assert len(ours) == 0  # nothing is loaded before every shard is encoded
        finished = sorted(staging.glob("shard-*.parquet"))
        assert len(finished) == 2
        written = {path: path.stat().st_mtime_ns for path in finished}
        report = add_with_ray(ours, source, shard_size=SHARD, staging=staging, keep_shards=True)
        assert len(report.reused) == 2 and len(report.encoded) == 1
        assert {shard_path(staging, n) for n in report.reused} == set(written)
        assert all(path.stat().st_mtime_ns == ns for path, ns in written.items())
        with single_process(source, tmp_path / "one.mmret", "hash:32") as reference:
            assert_same_index(ours, reference)
            assert report.skipped.skipped == 2
        # Run again: everything is indexed; the shards are reused, every item skipped.
        again = add_with_ray(ours, source, shard_size=SHARD, staging=staging)
        assert again.encoded == [] and again.added == 0
        assert again.skipped.skipped == 2 + len(ours)


def test_staging_of_another_run_is_refused(cluster: str, source: Path, tmp_path: Path) -> None:
    staging = tmp_path / "shards"
    plan_shards(staging, source, "hash:32", SHARD)
    with Retriever.create(tmp_path / "x.mmret", model="hash:16") as ours:
        with pytest.raises(Exception, match="holds the shards of another run"):
            add_with_ray(ours, source, shard_size=SHARD, staging=staging)
        with pytest.raises(Exception, match="multiple of 256"):
            add_with_ray(ours, source, shard_size=100)


def test_cli_ray_adds_to_an_existing_index(cluster: str, source: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.mmret"
    with Retriever.create(out, model="hash:32") as retriever:
        retriever.add(list(read_items(source))[:100])
    summary = json.loads(
        run("index", source, "--out", out, "--ray", "local", "--shard-size", SHARD, "--json")
    )
    assert summary["added"] == 700 - 100 and summary["items"] == 700
    assert summary["skipped"] == 2 + 100
    with (
        Retriever.open(out, readonly=True) as ours,
        single_process(source, tmp_path / "one.mmret", "hash:32") as reference,
    ):
        assert sorted(ours.ids()) == sorted(reference.ids())


def test_without_ray_the_error_says_how_to_install_it(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    out = run("index", source, "--out", tmp_path / "x.mmret", "--ray", "local", code=1)
    assert "pip install 'mmret[ray]'" in out


def test_an_address_nothing_answers_at_fails_at_once() -> None:
    """Checked before ``ray.init``, which would retry for minutes."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(InputError, match="no Ray cluster answers at"):
            check_reachable(address)


def test_ray_refuses_what_only_the_index_process_computes(source: Path, tmp_path: Path) -> None:
    out = run("index", source, "--out", tmp_path / "x.mmret", "--ray", "local",
              "--token-features", code=1)  # fmt: skip
    assert "--ray cannot be combined" in out and not (tmp_path / "x.mmret").exists()


@pytest.mark.slow
def test_cli_run_killed_halfway_resumes(cluster: str, source: Path, tmp_path: Path) -> None:
    """``kill -9`` of ``mmret index --ray`` once a shard is written; the rerun skips it."""
    out, staging = tmp_path / "killed.mmret", tmp_path / "shards"
    command = [
        str(Path(sys.executable).with_name("mmret")), "index", str(source), "--out", str(out),
        "--model", "hash-tokens:4x8", "--ray", cluster, "--ray-workers", "1",
        "--shard-size", str(SHARD), "--shards", str(staging),
    ]  # fmt: skip
    process = subprocess.Popen(command, start_new_session=True, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(staging.glob("shard-*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    written = sorted(staging.glob("shard-*.parquet"))
    assert 1 <= len(written) < 3, "the run finished before it could be killed"
    summary = json.loads(run("index", source, "--out", out, "--ray", cluster, "--shard-size",
                             SHARD, "--shards", staging, "--json"))  # fmt: skip
    assert summary["added"] == 700
    with (
        Retriever.open(out, readonly=True) as ours,
        single_process(source, tmp_path / "one.mmret", "hash-tokens:4x8") as reference,
    ):
        assert_same_index(ours, reference)
