from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmret.cli.main import app

runner = CliRunner()


def run(*args: str | Path, code: int = 0) -> str:
    """Standard output of a successful command; everything it printed when it fails."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result.stdout if code == 0 else result.output


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
