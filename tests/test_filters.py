from __future__ import annotations

import pytest

from mmret import InputError, parse_filter
from mmret.index.filters import to_sql


def test_parse_equality_sets_and_ranges() -> None:
    assert parse_filter(["kind=photo"]) == {"kind": "photo"}
    assert parse_filter(["year=2001"]) == {"year": 2001}
    assert parse_filter(["ok=true"]) == {"ok": True}
    assert parse_filter(["kind=a, b"]) == {"kind": ["a", "b"]}
    assert parse_filter(["year>=2000", "year<2010"]) == {"year": {"gte": 2000, "lt": 2010}}
    assert parse_filter(["w > 1.5", "w<=3"]) == {"w": {"gt": 1.5, "lte": 3}}


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("novalue", "expected key=value"),
        ("k=", "expected key=value"),
        ("year>=soon", "needs a number"),
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
