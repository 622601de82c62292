"""Integrity: damaged, truncated or newer-format index files fail clearly, ``mmret check`` finds
the damage, and ``mmret repair`` restores what the files still hold."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mmret import IndexFormatError, Item, Retriever
from mmret.cli.main import app
from mmret.encoders.hashing import HashEncoder
from mmret.errors import IndexBusyError
from mmret.index.faiss_ann import CACHE_FILE
from mmret.index.manifest import ITEMS_FILE, MANIFEST_FILE
from mmret.maintenance.integrity import check_index, repair_index

DIM = 16
N = 400


def unit(n: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A closed index of N items (long texts, so the database spans many pages)."""
    path = tmp_path / "index"
    with Retriever.create(path, encoder=HashEncoder(DIM), backend="faiss") as retriever:
        items = [Item(f"item-{i}", text=f"text {i} " * 40, metadata={"n": i}) for i in range(N)]
        retriever.add_vectors(items, unit(N))
    return path


def test_a_sound_index_checks_clean(folder: Path) -> None:
    report = check_index(folder)
    assert report.ok and report.items == N and not report.notices
    assert CliRunner().invoke(app, ["check", str(folder)]).exit_code == 0


def test_garbled_manifest_is_named_and_restored_from_the_database(folder: Path) -> None:
    (folder / MANIFEST_FILE).write_text('{"format": "mmret-index", "dim": ')
    with pytest.raises(IndexFormatError, match=r"manifest\.json: corrupt manifest"):
        Retriever.open(folder, readonly=True)
    assert not check_index(folder).ok
    report = repair_index(folder)
    assert any("restored manifest.json" in action for action in report.actions)
    assert check_index(folder).ok
    with Retriever.open(folder, readonly=True) as retriever:
        assert len(retriever) == N


def test_altered_manifest_fails_its_checksum(folder: Path) -> None:
    data = json.loads((folder / MANIFEST_FILE).read_text())
    data["dim"] = 32
    (folder / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(IndexFormatError, match=r"manifest\.json: checksum mismatch"):
        Retriever.open(folder)
    repair_index(folder)
    assert json.loads((folder / MANIFEST_FILE).read_text())["dim"] == DIM


def test_newer_format_is_refused_with_the_version(folder: Path) -> None:
    data = json.loads((folder / MANIFEST_FILE).read_text())
    data["format_version"] = 99
    (folder / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(IndexFormatError, match=r"manifest\.json: format version 99 is newer"):
        Retriever.open(folder, readonly=True)


def test_truncated_database_is_named_and_salvaged(folder: Path) -> None:
    database = folder / ITEMS_FILE
    size = database.stat().st_size
    with database.open("r+b") as handle:
        handle.truncate(size * 8 // 10 // 4096 * 4096)  # the last fifth of the pages is lost
    with pytest.raises(IndexFormatError, match=r"items\.sqlite: truncated"):
        Retriever.open(folder, readonly=True)
    result = CliRunner().invoke(app, ["check", str(folder)])
    assert result.exit_code == 1 and "truncated" in result.output
    report = repair_index(folder)
    assert 0 < report.items < N and report.items + report.lost == N
    assert check_index(folder).ok
    assert list(folder.glob("damaged-*/items.sqlite"))
    with Retriever.open(folder, readonly=True) as retriever:
        assert len(retriever) == report.items
        kept = {hit.id for hit in retriever.search_vectors(unit(N)[:50], k=1)[0]}
        assert kept  # what survived is searchable again


def test_a_damaged_row_fails_the_checksum(folder: Path) -> None:
    db = sqlite3.connect(folder / ITEMS_FILE)
    db.execute("UPDATE vectors SET vector = zeroblob(?) WHERE key = 8", (4 * DIM,))
    db.commit()
    db.close()
    report = check_index(folder)
    assert not report.ok and any("checksum mismatch" in p for p in report.problems)


def test_a_vector_of_the_wrong_size_is_found_and_dropped(folder: Path) -> None:
    db = sqlite3.connect(folder / ITEMS_FILE)
    db.execute("UPDATE vectors SET vector = zeroblob(3) WHERE key = 8")
    db.commit()
    db.close()
    assert any("row 8: vector of 3 bytes" in p for p in check_index(folder).problems)
    (folder / CACHE_FILE).unlink()  # else the cache serves the vectors and the row is not read
    with pytest.raises(IndexFormatError, match=r"items\.sqlite: stored vectors do not have 16"):
        Retriever.open(folder, readonly=True)
    report = repair_index(folder)
    assert report.items == N - 1 and report.lost == 1
    assert check_index(folder).ok


def test_a_missing_or_stray_vector_is_found(folder: Path) -> None:
    db = sqlite3.connect(folder / ITEMS_FILE)
    db.execute("DELETE FROM vectors WHERE key = 8")
    db.execute("INSERT INTO vectors VALUES (9999, zeroblob(64))")
    db.commit()
    db.close()
    problems = check_index(folder).problems
    assert any("row 8: its vector is missing" in p for p in problems)
    assert any("1 vectors belong to no item" in p for p in problems)
    assert repair_index(folder).items == N - 1
    assert check_index(folder).ok


def test_damaged_cache_is_only_a_cache(folder: Path) -> None:
    (folder / CACHE_FILE).write_bytes(b"garbage" * 100)
    (folder / "faiss-cache.npz.123.tmp").write_bytes(b"half a write")
    report = check_index(folder)
    assert report.ok and len(report.notices) == 2
    with Retriever.open(folder, readonly=True) as retriever:
        assert len(retriever) == N
    result = CliRunner().invoke(app, ["repair", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["ok"] is True
    assert not list(folder.glob("*.tmp"))


def test_repair_of_a_sound_index_changes_nothing(folder: Path) -> None:
    before = (folder / ITEMS_FILE).read_bytes()
    assert repair_index(folder).actions == ["nothing to repair"]
    assert (folder / ITEMS_FILE).read_bytes() == before


def test_repair_waits_for_no_writer(folder: Path) -> None:
    with Retriever.open(folder), pytest.raises(IndexBusyError, match="another writer"):
        repair_index(folder)


def test_a_repair_cut_short_is_finished_by_the_next(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = sqlite3.connect(folder / ITEMS_FILE)
    db.execute("UPDATE vectors SET vector = zeroblob(3) WHERE key = 8")
    db.commit()
    db.close()
    real_rename = Path.rename

    def crash_at_the_swap(self: Path, target: Path) -> Path:
        if Path(target) == folder / ITEMS_FILE:
            raise KeyboardInterrupt  # the process dies between moving aside and swapping in
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", crash_at_the_swap)
    with pytest.raises(KeyboardInterrupt):
        repair_index(folder)
    monkeypatch.undo()
    assert not (folder / ITEMS_FILE).exists()
    with pytest.raises(IndexFormatError, match="item database is missing"):
        Retriever.open(folder)
    assert "interrupted repair" in " ".join(check_index(folder).problems)
    report = repair_index(folder)
    assert "finished an interrupted repair" in report.actions[0]
    assert report.items == N - 1 and check_index(folder).ok


def test_a_writer_never_recreates_a_lost_database(folder: Path) -> None:
    (folder / ITEMS_FILE).unlink()
    with pytest.raises(IndexFormatError, match=r"items\.sqlite: item database is missing"):
        Retriever.open(folder)
    (folder / ITEMS_FILE).write_bytes(b"")
    with pytest.raises(IndexFormatError, match="bad header"):
        Retriever.open(folder)
    assert (folder / ITEMS_FILE).stat().st_size == 0


def test_an_older_development_format_is_refused_clearly(folder: Path) -> None:
    data = json.loads((folder / MANIFEST_FILE).read_text())
    data["format_version"] = 1
    (folder / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(IndexFormatError, match="format version 1 comes from a development"):
        Retriever.open(folder, readonly=True)


def test_an_unwritable_cache_is_a_warning_and_releases_the_index(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmret.index.faiss_ann import FaissIndex

    def disk_full(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FaissIndex, "save", disk_full)
    retriever = Retriever.open(folder, encoder=HashEncoder(DIM))
    retriever.add_vectors([Item("new", text="x")], unit(1, seed=3))
    with pytest.warns(RuntimeWarning, match="could not save the faiss cache"):
        retriever.close()
    assert not (folder / CACHE_FILE).exists()
    monkeypatch.undo()
    with Retriever.open(folder, wait=0) as again:  # the lock was released
        assert len(again) == N + 1


def test_bad_backend_options_leave_nothing_behind(tmp_path: Path) -> None:
    from mmret import InputError

    with pytest.raises(InputError, match="bad options"):
        Retriever.create(
            tmp_path / "index",
            encoder=HashEncoder(DIM),
            backend="faiss",
            backend_options={"nonsense": 1},
        )
    assert not (tmp_path / "index").exists()


def test_a_cache_in_the_old_layout_opens_and_the_next_writer_rewrites_it(folder: Path) -> None:
    import io

    import faiss

    from mmret.index.faiss_ann import FaissIndex

    record = np.load(folder / CACHE_FILE)
    index = faiss.read_index(str(folder / str(record["data"])))
    buffer = io.BytesIO()
    np.savez(
        buffer,
        index=faiss.serialize_index(index),
        keys=record["keys"],
        alive=record["alive"],
        epoch=record["epoch"],
        generation=record["generation"],
    )
    for path in FaissIndex(DIM).cache_files(folder):
        path.unlink()
    (folder / CACHE_FILE).write_bytes(buffer.getvalue())
    with Retriever.open(folder, readonly=True) as reader:
        assert reader.search_vectors(unit(N)[3:4], k=1)[0][0].id == "item-3"
    assert not list(folder.glob("faiss-*.index"))  # a reader writes nothing
    with Retriever.open(folder, encoder=HashEncoder(DIM)):
        pass
    assert len(list(folder.glob("faiss-*.index"))) == 1
    assert check_index(folder).ok


def test_a_cache_that_holds_other_items_is_found(folder: Path) -> None:
    db = sqlite3.connect(folder / ITEMS_FILE)
    db.execute("UPDATE items SET key = 10000 WHERE key = 5")  # the cache still holds key 5
    db.execute("UPDATE vectors SET key = 10000 WHERE key = 5")
    db.commit()
    db.close()
    report = check_index(folder)
    assert any("holds other items" in problem for problem in report.problems)


def test_check_and_repair_print_a_folder_named_like_markup_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "photos[bold]"
    with Retriever.create(path, encoder=HashEncoder(DIM)) as retriever:
        retriever.add_vectors([Item("a", text="a")], unit(1))
    for command in ("check", "repair"):
        result = CliRunner().invoke(app, [command, str(path)])
        assert result.exit_code == 0 and "photos[bold]" in result.output, result.output
