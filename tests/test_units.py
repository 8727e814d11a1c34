"""Sizes and ages as SPEC §3 spells them."""

from __future__ import annotations

import pytest

from casstore import InvalidInput
from casstore.units import parse_age, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("123", 123),
        ("10B", 10),
        ("1K", 1024),
        ("1KB", 1000),
        ("1KiB", 1024),
        ("500MiB", 500 * 1024**2),
        ("10GB", 10 * 1000**3),
        ("1.5G", int(1.5 * 1024**3)),
        ("2 TiB", 2 * 1024**4),
        ("3m", 3 * 1024**2),
        (4096, 4096),
    ],
)
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0s", 0),
        ("90", 90),
        ("15m", 900),
        ("12h", 43200),
        ("30d", 2592000),
        ("2w", 1209600),
        ("1.5h", 5400),
        (7, 7.0),
    ],
)
def test_ages(text, expected):
    assert parse_age(text) == expected


@pytest.mark.parametrize("bad", ["", "GB", "10XB", "-1", "1e3", "ten", "1 GB extra", -5])
def test_bad_sizes_name_the_value(bad):
    with pytest.raises(InvalidInput, match="invalid size") as info:
        parse_size(bad)
    assert info.value.exit_code == 2


@pytest.mark.parametrize("bad", ["", "1y", "soon", "-3d", "3 days", float("inf"), -1])
def test_bad_ages_name_the_value(bad):
    with pytest.raises(InvalidInput, match="invalid age"):
        parse_age(bad)
