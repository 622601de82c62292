from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmret import Retriever, read_items
from mmret.cli.main import app
from mmret.encoders.hashing import HashEncoder

from .cli import run, runner


@pytest.fixture
def index_dir(tmp_path: Path, photo_folder: Path) -> Path:
    out = tmp_path / "index"
    summary = json.loads(run("index", photo_folder, "--out", out, "--model", "hash:32", "--json"))
    assert summary["added"] == 5 and summary["skipped"] == 0
    return out


def test_index_and_search_json(index_dir: Path) -> None:
    results = json.loads(run("search", index_dir, "a blue square", "--k", "2", "--json"))["results"]
    assert len(results) == 2
    assert results[0]["id"] == "blue"
    assert set(results[0]) == {"id", "score", "image", "text", "metadata"}
    assert results[0]["text"] == "a blue square"
    assert results[0]["image"].endswith("blue.jpg")


def test_search_by_image_and_by_both(index_dir: Path, photo_folder: Path) -> None:
    image = photo_folder / "more" / "grey.png"
    only_image = json.loads(run("search", index_dir, "--image", image, "--json"))["results"]
    assert only_image[0]["id"] == "more/grey"
    assert only_image[0]["metadata"] == {"folder": "more"}
    both = json.loads(run("search", index_dir, "grey", "--image", image, "--json", "-k", "1"))
    assert both["results"][0]["id"] == "more/grey"


def test_filter_option(index_dir: Path) -> None:
    output = run("search", index_dir, "square", "--filter", "folder=more", "--json")
    assert [r["id"] for r in json.loads(output)["results"]] == ["more/grey"]


def test_table_output(index_dir: Path) -> None:
    output = run("search", index_dir, "a red square", "-k", "3")
    assert "red" in output and "score" in output


def test_index_again_adds_only_new_items(index_dir: Path, photo_folder: Path) -> None:
    (photo_folder / "new.txt").write_text("caption")
    from .conftest import solid

    solid((5, 5, 5)).save(photo_folder / "new.png")
    summary = json.loads(run("index", photo_folder, "--out", index_dir, "--json"))
    assert summary["added"] == 1 and summary["skipped"] == 5 and summary["items"] == 6
    assert "already in the index" in summary["reasons"][0]


def test_info_and_remove(index_dir: Path) -> None:
    info = json.loads(run("info", index_dir, "--json"))
    assert info["items"] == 5 and info["encoder"] == "hash:32"
    assert "removed 1 of 2" in run("remove", index_dir, "red", "nope")
    assert json.loads(run("info", index_dir, "--json"))["items"] == 4
    assert "encoder" in run("info", index_dir)


def test_bad_images_are_reported_not_fatal(tmp_path: Path, photo_folder: Path) -> None:
    (photo_folder / "broken.jpg").write_bytes(b"nope")
    out = tmp_path / "index2"
    result = runner.invoke(
        app, ["index", str(photo_folder), "--out", str(out), "--model", "hash:8"]
    )
    assert result.exit_code == 0, result.output
    assert "skipped 1 entry" in result.output and "broken.jpg" in result.output
    assert "indexed 5 items" in result.output


def test_errors_are_one_clear_line(tmp_path: Path, index_dir: Path) -> None:
    missing = run("search", tmp_path / "nothing", "x", code=1)
    assert "error:" in missing and "no such index folder" in missing and "Traceback" not in missing
    assert "give a text query" in run("search", index_dir, code=1)
    assert "filter 'year>=soon'" in run("search", index_dir, "x", "--filter", "year>=soon", code=1)
    assert "no such file or folder" in run(
        "index", tmp_path / "none", "--out", tmp_path / "o", code=1
    )
    assert "unknown encoder" in run(
        "index", tmp_path, "--out", tmp_path / "o2", "--model", "zzz", code=1
    )


@pytest.mark.parametrize(
    ("cwd", "spelling"),
    [
        (".", "photos"),
        (".", "./photos/"),
        ("elsewhere", "../photos"),
        ("elsewhere", "{tmp}/photos"),
    ],
)
def test_a_folder_indexes_everything_from_any_working_directory(
    tmp_path: Path, photo_folder: Path, monkeypatch: pytest.MonkeyPatch, cwd: str, spelling: str
) -> None:
    """``mmret index photos --out p.mmret`` once joined the folder onto its images twice."""
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / cwd)
    summary = json.loads(
        run(
            "index",
            spelling.format(tmp=tmp_path),
            "--out",
            "p.mmret",
            "--model",
            "hash:32",
            "--json",
        )
    )
    assert summary["added"] == 5 and summary["skipped"] == 0, summary["reasons"]
    hits = json.loads(run("search", "p.mmret", "a red square", "--k", "5", "--json"))["results"]
    assert {Path(hit["image"]) for hit in hits} == {
        path.resolve() for path in photo_folder.rglob("*") if path.suffix in {".jpg", ".png"}
    }


def write_manifest(kind: str, jsonl: Path) -> Path:
    """The JSONL manifest's rows as a ``kind`` manifest beside it (paths stay relative)."""
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    path = jsonl.with_suffix(f".{kind}")
    if kind == "csv":
        lines = ["id,image,text,year"] + [
            f"{row['id']},{row['image']},{row['captions'][0]},{row['year']}" for row in rows
        ]
        path.write_text("\n".join(lines) + "\n")
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
@pytest.mark.parametrize(
    ("cwd", "prefix"), [(".", "data/"), ("data", ""), ("elsewhere", "../data/")]
)
def test_manifest_image_paths_are_relative_to_the_manifest_from_any_working_directory(
    tmp_path: Path,
    manifest: Path,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    cwd: str,
    prefix: str,
) -> None:
    source = write_manifest(kind, manifest)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / cwd)
    summary = json.loads(
        run("index", prefix + source.name, "--out", "m.mmret", "--model", "hash:32", "--json")
    )
    assert summary["added"] == 4 and summary["skipped"] == 0, summary["reasons"]
    results = json.loads(run("search", "m.mmret", "a red square", "--k", "1", "--json"))["results"]
    assert results[0]["image"] == str((manifest.parent / "images" / "red.png").resolve())


def test_skips_of_the_source_reach_the_report(
    tmp_path: Path, photo_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From Python, ``add(read_items(...))`` reports what reading skipped beside its own skips,
    and a source made in one working directory reads the same from another."""
    (photo_folder / "broken.jpg").write_bytes(b"nope")
    (photo_folder / "blue.txt").write_bytes(b"\xff not UTF-8")
    (photo_folder / "link.jpg").symlink_to(photo_folder / "red.jpg")
    monkeypatch.chdir(tmp_path)
    source = read_items("photos/")
    monkeypatch.chdir(tmp_path.parent)
    with Retriever.create(tmp_path / "index", encoder=HashEncoder(8)) as retriever:
        report = retriever.add(source)
        again = retriever.add(source)
    assert report.added == 6  # five photos and the link, "blue" without its caption
    reasons = "\n".join(report.skipped.reasons)
    assert report.skipped.skipped == 2, reasons
    assert "blue.txt: caption unreadable" in reasons and "broken: " in reasons
    assert again.added == 0 and again.skipped.skipped == 8  # 6 in the index, 2 as before


def command_paths(command: object, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The argument paths of every command and group under ``command`` (the root is ``()``)."""
    paths = [path]
    for name, sub in getattr(command, "commands", {}).items():
        paths += command_paths(sub, (*path, name))
    return paths


def test_every_help_text_keeps_its_sentences_whole() -> None:
    """Typer kept docstring line breaks, so help broke mid-sentence ("ranks all / images")."""
    import typer.main

    root = typer.main.get_command(app)
    paths = command_paths(root)
    assert ("eval", "retrieval") in paths and ("index",) in paths
    for path in paths:
        command = root
        for name in path:
            command = command.commands[name]  # type: ignore[attr-defined]
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "400"})
        assert result.exit_code == 0, result.output
        lines = [line.strip() for line in result.output.splitlines()]
        for paragraph in (command.help or "").split("\n\n"):
            assert "\n" not in paragraph.strip(), (path, paragraph)
            assert paragraph.strip() in lines, (path, paragraph)


def test_photos_in_year_folders_filter_by_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commonest photo layout, indexed and searched with relative paths as a user types
    them: the folder name ``2017`` is stored as a string and ``folder=2017`` finds it."""
    from .conftest import solid

    for year, colour in (("2017", (200, 30, 30)), ("2018", (30, 30, 200))):
        (tmp_path / "photos" / year).mkdir(parents=True)
        solid(colour).save(tmp_path / "photos" / year / f"{year}-a.jpg")
    monkeypatch.chdir(tmp_path)
    run("index", "photos", "--out", "photos.mmret", "--model", "hash:32")
    found = run("search", "photos.mmret", "a red car", "--filter", "folder=2017", "--json")
    results = json.loads(found)["results"]
    assert [r["id"] for r in results] == ["2017/2017-a"]
    assert results[0]["metadata"] == {"folder": "2017"}
    quoted = run("search", "photos.mmret", "a red car", "--filter", 'folder="2018"', "--json")
    assert [r["id"] for r in json.loads(quoted)["results"]] == ["2018/2018-a"]


def test_help_lists_index_and_search_before_maintenance() -> None:
    shown = run("--help")
    order = [shown.index(f" {name} ") for name in ("index", "search", "serve", "info", "check")]
    assert order == sorted(order), shown
