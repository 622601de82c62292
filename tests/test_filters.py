from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mmret import InputError, Item, Retriever, parse_filter
from mmret.index.filters import to_sql


def test_parse_equality_sets_and_ranges() -> None:
    assert parse_filter(["kind=photo"]) == {"kind": "photo"}
    assert parse_filter(["year=2001"]) == {"year": [2001, "2001"]}  # either spelling matches
    assert parse_filter(["ok=true"]) == {"ok": [True, "true"]}
    assert parse_filter(["kind=a, b"]) == {"kind": ["a", "b"]}
    assert parse_filter(["year>=2000", "year<2010"]) == {"year": {"gte": 2000, "lt": 2010}}
    assert parse_filter(["w > 1.5", "w<=3"]) == {"w": {"gt": 1.5, "lte": 3}}


@pytest.mark.parametrize(
    ("expression", "parsed"),
    [
        ('folder="2017"', {"folder": "2017"}),  # quotes force a string
        ("folder='2017'", {"folder": "2017"}),
        ("taken=2017-05-01", {"taken": "2017-05-01"}),  # a date is a string
        ("code=007", {"code": "007"}),  # not a JSON number
        ("w=1.50", {"w": [1.5, "1.50"]}),
        ('place="Paris, France",Lyon', {"place": ["Paris, France", "Lyon"]}),
        ("name=O'Brien", {"name": "O'Brien"}),  # a quote inside a word is a letter
        ("n=NaN", {"n": "NaN"}),  # not a number that can be stored: a string only
        (f"n={2**64}", {"n": str(2**64)}),
    ],
)
def test_parse_literals(expression: str, parsed: dict[str, object]) -> None:
    assert parse_filter([expression]) == parsed


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("novalue", "expected key=value"),
        ("k=", "expected key=value"),
        ("year>=soon", "needs a number"),
        ('k="open', "unbalanced quotes"),
        ("k=a,,b", "an empty value"),
        ("k=a,", "an empty value"),
    ],
)
def test_parse_errors_name_the_expression(expression: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_filter([expression])


def test_equality_then_range_on_one_key_is_refused() -> None:
    with pytest.raises(InputError, match="already has an equality filter"):
        parse_filter(["year=2000", "year>1999"])


def test_sql_is_parameterised() -> None:
    where, params = to_sql({"tag": "x'; DROP TABLE items; --"})
    assert "DROP" not in where and params == ["x'; DROP TABLE items; --"]


@pytest.mark.parametrize(
    ("filter_", "message"),
    [
        ({"bad key!": 1}, "filter key"),
        ({"k": {"between": 1}}, "a range takes"),
        ({"k": {"gt": "x"}}, "expected a number"),
        ({"k": []}, "empty set"),
        ({"k": {"a": 1}}, "a range takes"),
        ({"k": None}, "expected a string"),
        ({"k": {"gt": float("nan")}}, "NaN"),
        ({"k": 2**63}, "does not fit in 64 bits"),
        ({"k": [1, -(2**63) - 1]}, "does not fit in 64 bits"),
    ],
)
def test_bad_filters(filter_: dict[str, object], message: str) -> None:
    with pytest.raises(InputError, match=message):
        to_sql(filter_)


MIXED = {  # one key stored as a string, a number, a date-like string and a boolean
    "s2017": {"folder": "2017", "year": 2017},
    "n2017": {"folder": 2017, "year": "2017"},
    "s1.5": {"folder": "1.5"},
    "date": {"folder": "2017-05-01", "year": 2017.0},
    "yes": {"folder": True},
    "text-yes": {"folder": "true"},
}


@pytest.fixture
def mixed(tmp_path: Path) -> Iterator[Retriever]:
    with Retriever.create(tmp_path / "mixed", model="hash:16") as retriever:
        items = [Item(id_, text=f"item {id_}", metadata=meta) for id_, meta in MIXED.items()]
        retriever.add(items)
        yield retriever


@pytest.mark.parametrize(
    ("expressions", "expected"),
    [
        (["folder=2017"], {"s2017", "n2017"}),  # a folder named by year, stored either way
        (['folder="2017"'], {"s2017"}),
        (["folder=2017-05-01"], {"date"}),
        (["folder=1.5"], {"s1.5"}),
        (["folder=true"], {"yes", "text-yes"}),
        (["folder='true'"], {"text-yes"}),
        (["folder=2017,1.5"], {"s2017", "n2017", "s1.5"}),
        (["year>=2017"], {"s2017", "date", "n2017"}),  # SQLite sorts text above numbers
        (["year<2018"], {"s2017", "date"}),
        (["year=2017"], {"s2017", "n2017", "date"}),
    ],
)
def test_cli_filters_match_values_written_the_same_way(
    mixed: Retriever, expressions: list[str], expected: set[str]
) -> None:
    hits = mixed.search(["item"], k=10, filter=parse_filter(expressions))[0]
    assert {hit.id for hit in hits} == expected
