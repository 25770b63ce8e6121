"""The shared answer extraction: <answer> blocks, \\boxed{}, numbers in running text."""

from __future__ import annotations

from decimal import Decimal

import pytest

from rewards.answer import (
    answer_or_text,
    extract_answer,
    extract_boxed,
    find_numbers,
    parse_number,
    remove_numbers,
    single_integer,
)


def test_extract_answer_takes_the_last_block_across_lines() -> None:
    assert extract_answer("<answer>1</answer> then <answer>\n 2\n3 </answer>") == "2\n3"
    assert extract_answer("<answer></answer>") == ""
    assert extract_answer("no tags") is None
    assert extract_answer("<answer>unclosed") is None
    assert extract_answer("</answer>reversed<answer>") is None


def test_answer_or_text() -> None:
    assert answer_or_text("<think>x</think><answer> 7 </answer>") == "7"
    assert answer_or_text("  just text \n") == "just text"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so \boxed{72}.", "72"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{1} or rather \boxed{ 2 }", "2"),
        (r"\boxed{3} and a truncated \boxed{\frac{4}{", "3"),  # unclosed: the earlier one
        (r"\boxed{", None),
        ("72", None),
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("价格123元", ["123"]),  # CJK around a number
        ("1,200.50 and -3", ["1200.5", "-3"]),
        ("¥1,000", ["1000"]),
        ("3-4 apples", ["3", "4"]),  # a range, not minus four
        ("2023-01-05", ["2023", "1", "5"]),
        ("x = −2.5", ["-2.5"]),  # Unicode minus
        ("1,2", ["1", "2"]),  # not a thousands separator
        ("no numbers", []),
    ],
)
def test_find_numbers(text: str, expected: list[str]) -> None:
    assert find_numbers(text) == [Decimal(e) for e in expected]


def test_remove_numbers() -> None:
    assert remove_numbers("costs ¥1,200 for 3 kg") == "costs ¥ for  kg"


def test_parse_number_is_strict() -> None:
    assert parse_number(" 1,000 ") == 1000
    assert parse_number("72.0") == parse_number("72")
    for bad in ["1e5", "nan", "inf", "1_000", "1,2", "abc", ""]:
        with pytest.raises(ValueError, match="not a number"):
            parse_number(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        *[("3", 3), (" 3. ", 3), ("3.0", 3), ("There are 12 cubes", 12), ("-2", -2)],
        *[("3.5", None), ("3 or 4", None), ("three", None), ("", None)],
    ],
)
def test_single_integer(text: str, expected: int | None) -> None:
    assert single_integer(text) == expected
