from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmret import InputError, SkipReport, read_items
from mmret.ingest.sources import read_records


def test_folder_source_ids_captions_and_subfolders(photo_folder: Path) -> None:
    items = {item.id: item for item in read_items(photo_folder)}
    assert set(items) == {"red", "green", "blue", "yellow", "more/grey"}
    assert items["red"].text == "a red square"
    assert items["more/grey"].text is None
    assert items["more/grey"].metadata == {"folder": "more"}
    assert items["red"].image_path is not None and items["red"].image_path.endswith("red.jpg")


def test_folder_caption_that_is_not_utf8_is_reported(photo_folder: Path) -> None:
    (photo_folder / "red.txt").write_bytes(b"\xff\xfe bad")
    source = read_items(photo_folder)
    items = {item.id: item for item in source}
    assert items["red"].text is None  # the image is still indexed
    report = source.skipped
    assert report.skipped == 1 and "red.txt: caption unreadable" in report.reasons[0]


def test_jsonl_manifest(manifest: Path) -> None:
    records = list(read_records(manifest))
    assert [r.id for r in records] == ["red", "green", "blue", "yellow"]
    first = records[0]
    assert first.captions == ("a red square", "something red")
    assert first.metadata == {"year": 2000, "warm": True, "kind": "colour"}
    assert first.image == (manifest.parent / "images" / "red.png").resolve()
    assert first.to_item().text == "a red square\nsomething red"


def test_bad_jsonl_lines_are_skipped_with_reasons(tmp_path: Path, manifest: Path) -> None:
    bad = tmp_path / "data" / "bad.jsonl"
    good = manifest.read_text().splitlines()
    bad.write_bytes(
        "\n".join(
            [
                good[0],
                "{not json",
                json.dumps({"id": "x", "image": "images/missing.png"}),
                json.dumps({"id": "y"}),
                json.dumps({"text": "no id"}),
                json.dumps({"id": "z", "text": 5}),
                json.dumps({"id": "w", "captions": "not a list"}),
                json.dumps([1, 2]),
                good[0],  # duplicate id
                json.dumps({"id": "nan", "text": "t", "score": float("nan")}),
            ]
        ).encode()
        + b'\n{"id": "u", "text": "\xff"}\n'
        + good[1].encode()
        + b"\n"
    )
    report = SkipReport()
    ids = [record.id for record in read_records(bad, report)]
    assert ids == ["red", "green"]
    assert report.skipped == 10
    reasons = "\n".join(report.reasons)
    for expected in [
        "bad.jsonl:2: invalid JSON",
        "bad.jsonl:3: image file not found",
        "bad.jsonl:4: has neither an image nor a text",
        "bad.jsonl:5: missing or invalid 'id'",
        "bad.jsonl:6: 'text' must be a string",
        "bad.jsonl:7: 'captions' must be a list of strings",
        "bad.jsonl:8: expected an object",
        "bad.jsonl:9: duplicate id 'red'",
        "bad.jsonl:10: item 'nan': metadata is not JSON-serialisable",
        "bad.jsonl:11: not valid UTF-8",
    ]:
        assert expected in reasons


def test_csv_manifest_types_cells(tmp_path: Path, manifest: Path) -> None:
    path = manifest.parent / "items.csv"
    path.write_text(
        "id,image,text,year,score,tag,captions\n"
        "red,images/red.png,a red square,2001,0.5,warm,\n"
        'blue,images/blue.png,,2003,,cold,"[""a blue one"", ""blue""]"\n'
        "note,,just text,,,,\n"
    )
    records = {r.id: r for r in read_records(path)}
    assert records["red"].metadata == {"year": 2001, "score": 0.5, "tag": "warm"}
    assert records["blue"].captions == ("a blue one", "blue")
    assert records["note"].image is None and records["note"].captions == ("just text",)


def test_parquet_manifest(tmp_path: Path, manifest: Path) -> None:
    table = pa.table(
        {
            "id": ["red", "green"],
            "image": ["images/red.png", "images/green.png"],
            "captions": [["a red square"], ["a green square", "green"]],
            "year": [2000, 2001],
        }
    )
    path = manifest.parent / "items.parquet"
    pq.write_table(table, path)
    records = list(read_records(path))
    assert [r.id for r in records] == ["red", "green"]
    assert records[1].captions == ("a green square", "green")
    assert records[1].metadata == {"year": 2001}


def test_unknown_source_kinds_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file or folder"):
        list(read_records(tmp_path / "nothing"))
    other = tmp_path / "items.xml"
    other.write_text("<x/>")
    with pytest.raises(InputError, match=r"items\.xml: not a folder or a manifest"):
        list(read_records(other))


def test_corrupt_parquet_fails_clearly(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 garbage")
    with pytest.raises(InputError, match=r"broken\.parquet: cannot be read as Parquet"):
        list(read_records(path))


def test_skip_report_summary_caps_reasons() -> None:
    report = SkipReport()
    for number in range(25):
        report.skip(f"reason {number}")
    summary = report.summary()
    assert "skipped 25 entries" in summary and "reason 19" in summary and "5 more" in summary
    assert "reason 20" not in summary
