"""Hostile input: fuzzed manifests, images and queries, huge images, decompression bombs, a
10 MB caption, invalid UTF-8, NaN vectors and wrong dimensions. Nothing may crash, hang, blow
up memory or lose what is already stored: bad input is a clear error or a reported skip."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mmret import ImageLoadError, InputError, Item, Query, Retriever, SkipReport, load_image
from mmret.cli.main import app
from mmret.encoders.hashing import HashEncoder
from mmret.index.filters import parse_filter
from mmret.ingest.sources import read_records

from .conftest import solid
from .forking import peak_memory_of

FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
ROWS = st.dictionaries(
    st.sampled_from(["id", "image", "text", "captions", "year", "kind"]), JSON_VALUES, max_size=5
)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def zeros_png(width: int, height: int, inflated_bytes: int) -> bytes:
    """A grayscale PNG of ``width`` x ``height`` whose pixel data inflates to ``inflated_bytes``
    of zeros, built without ever holding them in memory."""
    compressor = zlib.compressobj(9)
    block = bytes(1 << 20)
    parts = [compressor.compress(block) for _ in range(inflated_bytes >> 20)]
    data = b"".join(parts) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", data)
        + png_chunk(b"IEND", b"")
    )


@pytest.fixture
def retriever(tmp_path: Path) -> Retriever:
    retriever = Retriever.create(tmp_path / "index", encoder=HashEncoder(16))
    retriever.add([Item(f"item-{i}", text=f"a caption {i}", metadata={"n": i}) for i in range(20)])
    return retriever


# -- manifests --------------------------------------------------------------------------------


@FUZZ
@given(
    lines=st.lists(st.one_of(ROWS.map(lambda r: json.dumps(r).encode()), st.binary()), max_size=12)
)
def test_any_jsonl_lines_are_read_or_skipped(tmp_path: Path, lines: list[bytes]) -> None:
    lines = [line.replace(b"\n", b" ").replace(b"\r", b" ") for line in lines]
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines))
    report = SkipReport()
    records = list(read_records(path, report))
    assert len(records) + report.skipped == sum(1 for line in lines if line.strip())
    assert len(report.reasons) == min(report.skipped, 20)


@FUZZ
@given(text=st.text(max_size=300))
def test_any_csv_text_is_read_or_refused_clearly(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.csv"
    path.write_text("id,text,year\n" + text, encoding="utf-8", errors="surrogatepass")
    try:
        list(read_records(path, SkipReport()))
    except InputError as error:
        assert "fuzz.csv" in str(error)


def test_invalid_utf8_is_skipped_and_named(tmp_path: Path) -> None:
    path = tmp_path / "items.jsonl"
    path.write_bytes(b'{"id": "a", "text": "fine"}\n{"id": "b", "text": "\xff\xfe"}\n')
    report = SkipReport()
    assert [r.id for r in read_records(path, report)] == ["a"]
    assert "items.jsonl:2: not valid UTF-8" in report.reasons[0]
    for bad in ("\ud800", "caption \udcff"):
        with pytest.raises(InputError, match="unpaired surrogate"):
            Item("x", text=bad)
        with pytest.raises(InputError, match="unpaired surrogate"):
            Query(text=bad)


def test_a_ten_megabyte_caption_is_stored_whole_and_encoded_cut(tmp_path: Path) -> None:
    caption = "a dog runs on the beach " * 440_000  # 10.6 MB
    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps({"id": "big", "text": caption}) + "\n")
    items = [record.to_item() for record in read_records(path)]
    with Retriever.create(tmp_path / "index", encoder=HashEncoder(16)) as retriever:
        assert retriever.add(items).added == 1
        hit = retriever.search(["a dog runs on the beach"], k=1)[0][0]
    assert hit.id == "big" and hit.text == caption.strip()


# -- images -----------------------------------------------------------------------------------


def sample_files() -> list[bytes]:
    image = solid((200, 40, 90), size=(24, 16))
    files = []
    for fmt, extra in [("PNG", {}), ("JPEG", {}), ("GIF", {}), ("BMP", {}), ("TIFF", {})]:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **extra)
        files.append(buffer.getvalue())
    return files


SAMPLES = sample_files()


def decodes_or_refuses(data: bytes) -> None:
    try:
        image = load_image(data)
    except ImageLoadError as error:
        assert str(error).startswith(f"<{len(data)} bytes>: ")
        return
    assert image.mode == "RGB" and image.width > 0 and image.height > 0


@FUZZ
@given(data=st.binary(max_size=2000))
def test_any_bytes_decode_or_fail_clearly(data: bytes) -> None:
    decodes_or_refuses(data)


@FUZZ
@given(
    sample=st.sampled_from(SAMPLES),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    cut=st.integers(0, 10_000),
)
def test_damaged_real_images_decode_or_fail_clearly(
    sample: bytes, edits: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(sample)
    for position, value in edits:
        data[position % len(data)] = value
    decodes_or_refuses(bytes(data[: max(8, len(data) - cut % len(data))]))


def test_a_100_megapixel_png_is_refused_from_its_header() -> None:
    bomb = zeros_png(10_000, 10_000, inflated_bytes=1 << 20)  # 100 MP, 1 MB of data given
    refuses_as_a_bomb(bomb)
    assert peak_memory_of(refuses_as_a_bomb, bomb) < 50


def refuses_as_a_bomb(data: bytes) -> None:
    with pytest.raises(ImageLoadError, match="possible decompression bomb"):
        load_image(data)


def test_a_zip_bomb_png_inflates_only_what_the_image_needs() -> None:
    bomb = zeros_png(64, 64, inflated_bytes=256 << 20)  # 256 MB of zeros behind a 64x64 image
    assert len(bomb) < 1 << 20
    assert peak_memory_of(load_image, bomb) < 100
    assert load_image(bomb).size == (64, 64)


def test_a_text_chunk_bomb_is_refused() -> None:
    clean = SAMPLES[0]
    text_bomb = png_chunk(b"zTXt", b"comment\x00\x00" + zlib.compress(bytes(64 << 20), 9))
    bomb = clean[:33] + text_bomb + clean[33:]  # after the IHDR chunk
    decodes_or_refuses(bomb)
    assert peak_memory_of(decodes_or_refuses, bomb) < 100


def test_a_bad_image_in_a_batch_loses_nothing_else(tmp_path: Path, retriever: Retriever) -> None:
    (tmp_path / "bomb.png").write_bytes(zeros_png(10_000, 10_000, 1 << 20))
    solid((10, 200, 10)).save(tmp_path / "fine.png")
    report = retriever.add(
        [Item("bomb", image=str(tmp_path / "bomb.png")), Item("fine", image=tmp_path / "fine.png")]
    )
    assert report.added == 1 and "decompression bomb" in report.skipped.reasons[0]
    assert len(retriever) == 21


# -- vectors and queries ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vectors", "message"),
    [
        (np.full((2, 16), np.nan), "NaN"),
        (np.full((2, 16), np.inf), "NaN or infinite"),
        (np.ones((2, 17)), r"shape \(2, 16\)"),
        (np.ones((3, 16)), r"shape \(2, 16\)"),
        (np.ones(32), r"shape \(2, 16\)"),
    ],
)
def test_bad_vectors_are_refused_and_nothing_is_lost(
    retriever: Retriever, vectors: np.ndarray, message: str
) -> None:
    with pytest.raises(InputError, match=message):
        retriever.add_vectors([Item("v1", text="x"), Item("v2", text="y")], vectors)
    assert len(retriever) == 20
    assert retriever.search(["a caption 3"], k=1)[0][0].id == "item-3"


@pytest.mark.parametrize(
    ("queries", "message"),
    [
        (np.full((1, 16), np.nan), "NaN"),
        (np.ones((1, 8)), r"shape \(Q, 16\)"),
        (np.ones(16), r"shape \(Q, 16\)"),
        (np.ones((1, 16, 1)), r"shape \(Q, 16\)"),
    ],
)
def test_bad_query_vectors_are_refused(
    retriever: Retriever, queries: np.ndarray, message: str
) -> None:
    with pytest.raises(InputError, match=message):
        retriever.search_vectors(queries, k=3)


@FUZZ
@given(expressions=st.lists(st.text(max_size=30), max_size=4))
def test_any_filter_expression_parses_or_fails_clearly(expressions: list[str]) -> None:
    try:
        parsed = parse_filter(expressions)
    except InputError as error:
        assert "filter" in str(error)
        return
    assert isinstance(parsed, dict)


FILTER_VALUES = st.one_of(
    JSON_SCALARS,
    st.lists(JSON_SCALARS, max_size=3),
    st.dictionaries(st.sampled_from(["gt", "gte", "lt", "lte", "eq", ""]), JSON_SCALARS),
)


@FUZZ
@given(filter_=st.dictionaries(st.text(max_size=12), FILTER_VALUES, max_size=3))
def test_any_filter_searches_or_fails_clearly(
    retriever: Retriever, filter_: dict[str, object]
) -> None:
    try:
        hits = retriever.search(["a caption"], k=5, filter=filter_)[0]
    except InputError as error:
        assert "filter" in str(error)
    else:
        assert len(hits) <= 5
    assert len(retriever) == 20


# -- the whole `mmret index` path: parsed, checked, encoded, stored ---------------------------

NASTY_TEXT = st.text(
    st.one_of(
        st.characters(), st.sampled_from(["\x00", "\ud800", "\udcff", "\udfff", "[", "/", "]"])
    ),
    max_size=12,
)
NASTY_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63),  # beyond SQLite's integers, stored in the JSON text
    st.floats(),  # NaN and infinities too: JSON cannot hold them
    NASTY_TEXT,
)
NASTY_VALUES = st.recursive(
    NASTY_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(NASTY_TEXT, inner, max_size=3),
    max_leaves=10,
)
NASTY_ROWS = st.builds(
    lambda known, other: {**other, **known},
    st.fixed_dictionaries(
        {"id": st.one_of(NASTY_TEXT, st.integers(), st.floats(), st.booleans(), st.none())},
        optional={
            "text": st.one_of(NASTY_TEXT, NASTY_VALUES),
            "captions": st.lists(NASTY_TEXT, max_size=2),
            "image": st.sampled_from(["images/ok.png", "images/missing.png", "images/ok.png\x00"]),
            "kind": NASTY_VALUES,
            "nested": st.integers(1, 40).map(lambda depth: json.loads("[" * depth + "]" * depth)),
        },
    ),
    st.dictionaries(NASTY_TEXT, NASTY_VALUES, max_size=2),  # any other key is metadata
)
NASTY_LINES = st.one_of(
    NASTY_ROWS.map(lambda row: json.dumps(row).encode()),  # lone surrogates as \ud800 escapes
    NASTY_ROWS.map(
        lambda row: json.dumps(row, ensure_ascii=False).encode("utf-8", "surrogatepass")
    ),
    st.sampled_from(
        [
            b'{"id": "huge", "text": "x", "n": ' + b"9" * 5000 + b"}",  # over Python's digit limit
            b'{"id": "deep", "text": "x", "n": ' + b"[" * 5000 + b"]" * 5000 + b"}",
            b'{"id": "d", "text": "\\u0000\\ud800 weird"}',  # the line of the bug report
        ]
    ),
)


def stored_rows(index: Path) -> dict[str, tuple[str | None, dict[str, object]]]:
    """Every stored item's text and metadata, by id."""
    with Retriever.open(index, readonly=True) as retriever:
        hits = retriever.search_vectors(np.ones((1, 16), np.float32), k=10**6)[0]
    return {hit.id: (hit.text, hit.metadata) for hit in hits}


@settings(FUZZ, max_examples=60)  # each example is a whole `mmret index` run
@given(lines=st.lists(NASTY_LINES, min_size=1, max_size=8))
def test_no_manifest_line_stops_mmret_index(tmp_path: Path, lines: list[bytes]) -> None:
    """Each line is indexed intact or skipped with a reason naming it; the run always ends
    well, with every good line indexed, whatever comes before or after it."""
    folder = tmp_path / "fuzz"
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "images").mkdir(parents=True)
    solid((10, 20, 30)).save(folder / "images" / "ok.png")
    good = b'{"id": "good-after", "text": "a good line after the others", "year": 2001}'
    (folder / "items.jsonl").write_bytes(b"\n".join([*lines, good]) + b"\n")
    result = CliRunner().invoke(
        app,
        [
            "index",
            str(folder / "items.jsonl"),
            "--out",
            str(folder / "index"),
            "--model",
            "hash:16",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["added"] + summary["skipped"] == len(lines) + 1
    for reason in summary["reasons"]:
        assert re.match(r"items\.jsonl:\d+: ", reason), reason
    stored = stored_rows(folder / "index")
    assert len(stored) == summary["added"] and stored["good-after"][1] == {"year": 2001}
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError):
            continue
        item_id = str(row.get("id")) if isinstance(row, dict) else None
        if item_id in stored and f"items.jsonl:{number}: " not in " ".join(summary["reasons"]):
            metadata = {
                k: v for k, v in row.items() if k not in {"id", "text", "captions", "image"}
            }
            assert stored[item_id][1] == metadata  # stored intact, not mangled


def test_unstorable_values_are_skipped_with_reasons_and_the_rest_indexed(tmp_path: Path) -> None:
    """Valid JSON that cannot be stored, through `mmret index` with the shipped model."""
    solid((10, 200, 10)).save(tmp_path / "ok.png")
    rows = [
        b'{"id": "d", "text": "\\u0000\\ud800 weird"}',
        b'{"id": "nul", "text": "a NUL \\u0000 inside is kept"}',
        b'{"id": "path", "image": "ok.png\\u0000.png"}',
        b'{"id": "huge", "text": "x", "n": ' + b"9" * 5000 + b"}",
        b'{"id": "big", "text": "an integer beyond 64 bits", "n": 123456789012345678901234567890}',
        b'{"id": "deep", "text": "x", "n": ' + b"[" * 40 + b"]" * 40 + b"}",
        b'{"id": "nested", "text": "nested metadata", "n": {"a": [1, {"b": null}]}}',
        b'{"id": 1.5, "text": "a float id"}',
        b'{"id": ["a"], "text": "a list id"}',
        b'{"id": 42, "text": "an integer id"}',
        b'{"id": "key", "text": "x", "\\udcff": 1}',
        b'{"id": "[/x]", "image": "[/x].png"}',
        b'{"id": "last", "image": "ok.png", "text": "the last line"}',
    ]
    (tmp_path / "items.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    result = CliRunner().invoke(
        app, ["index", str(tmp_path / "items.jsonl"), "--out", str(tmp_path / "index")]
    )
    assert result.exit_code == 0, result.output
    assert "indexed 5 items" in result.output
    for reason in [
        "items.jsonl:1: item 'd': text is not valid Unicode (unpaired surrogate at position 1)",
        "items.jsonl:3: image path 'ok.png\\x00.png' cannot be used (embedded null byte)",
        "items.jsonl:4: invalid JSON (Exceeds the limit (4300 digits)",
        "items.jsonl:6: item 'deep': metadata is nested more than 32 levels deep",
        "items.jsonl:8: missing or invalid 'id' (1.5)",
        "items.jsonl:9: missing or invalid 'id' (['a'])",
        "items.jsonl:11: item 'key': metadata holds text that is not valid Unicode",
        "items.jsonl:12: image file not found: ",
    ]:
        assert reason in result.output
    with Retriever.open(tmp_path / "index", readonly=True) as retriever:
        hits = {hit.id: hit for hit in retriever.search(["nested metadata"], k=10)[0]}
    assert set(hits) == {"nul", "big", "nested", "42", "last"}
    assert hits["nul"].text == "a NUL \x00 inside is kept"
    assert hits["big"].metadata == {"n": 123456789012345678901234567890}
    assert hits["nested"].metadata == {"n": {"a": [1, {"b": None}]}}


def test_bad_csv_and_parquet_rows_are_skipped_and_the_rest_indexed(tmp_path: Path) -> None:
    (tmp_path / "items.csv").write_bytes(
        b"id,text,year\n"
        b"a,fine,2001\n"
        b"b,not \xff UTF-8,2002\n"
        b"c," + b"x" * 200_000 + b",2003\n"  # over the csv module's field limit
        b"d,also fine,2004\n"
    )
    table = pa.table({"id": ["e", "f"], "text": ["ok", "ok too"], "blob": [None, b"\x00\x01"]})
    pq.write_table(table, tmp_path / "items.parquet")
    for name, added, reasons in [
        (
            "items.csv",
            2,
            ["items.csv:3: not valid UTF-8", "items.csv:4: not valid CSV (field larger"],
        ),
        ("items.parquet", 1, ["items.parquet:row 2: item 'f': metadata is not JSON-serialisable"]),
    ]:
        out = tmp_path / f"{name}.mmret"
        result = CliRunner().invoke(
            app, ["index", str(tmp_path / name), "--out", str(out), "--model", "hash:8"]
        )
        assert result.exit_code == 0, result.output
        assert f"indexed {added} items" in result.output
        assert all(reason in result.output for reason in reasons), result.output


def test_a_file_name_that_is_not_utf8_is_skipped_and_reported(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    solid((1, 2, 3)).save(folder / "fine.png")
    solid((1, 2, 3)).save(os.fsdecode(bytes(folder) + b"/caf\xe9 [red].png"))
    result = CliRunner().invoke(
        app, ["index", str(folder), "--out", str(tmp_path / "i"), "--model", "hash:8"]
    )
    assert result.exit_code == 0, result.output
    assert "indexed 1 items" in result.output
    assert "caf\\udce9 [red].png: item id is not valid Unicode" in result.output
