"""Weighted edit distance against a brute-force enumeration of all alignments, hand cases,
and the cases where weighting a unit-cost Levenshtein's operations gets it wrong."""

from __future__ import annotations

import random

import pytest

from rewards.edit_distance import (
    ImportantChars,
    _distance_numpy,
    _distance_python,
    _strip_common_affixes,
    weighted_edit_distance,
    weighted_length,
)

W = ImportantChars("0123456789¥$", 2.0)
ALPHABETS = ["ab12", "ab1¥$", "中文字1", "金额元¥5", "aé中2$ "]


def brute_force(a: str, b: str, w) -> float:
    """Minimum cost over every alignment, by plain recursion (no memo, no DP table):
    the first characters are either aligned with each other, or one of them is dropped."""
    if not a:
        return sum(w(c) for c in b)
    if not b:
        return sum(w(c) for c in a)
    substitute = 0.0 if a[0] == b[0] else max(w(a[0]), w(b[0]))
    return min(
        substitute + brute_force(a[1:], b[1:], w),
        w(a[0]) + brute_force(a[1:], b, w),
        w(b[0]) + brute_force(a, b[1:], w),
    )


def unit_backtrace_cost(a: str, b: str, w) -> float:
    """The flawed recipe: unit-cost Levenshtein DP, then one backtrace (preferring the
    diagonal, as common implementations do) with each operation on it charged its weight."""
    n, m = len(a), len(b)
    d = [[i + j if i == 0 or j == 0 else 0 for j in range(m + 1)] for i in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            d[i][j] = min(
                d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1])
            )
    cost, i, j = 0.0, n, m
    while i > 0 or j > 0:
        if i > 0 and j > 0 and d[i][j] == d[i - 1][j - 1] + (a[i - 1] != b[j - 1]):
            cost += 0.0 if a[i - 1] == b[j - 1] else max(w(a[i - 1]), w(b[j - 1]))
            i, j = i - 1, j - 1
        elif i > 0 and d[i][j] == d[i - 1][j] + 1:
            cost, i = cost + w(a[i - 1]), i - 1
        else:
            cost, j = cost + w(b[j - 1]), j - 1
    return cost


def random_pairs(count: int, max_len: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        alphabet = rng.choice(ALPHABETS)
        a = "".join(rng.choices(alphabet, k=rng.randint(0, max_len)))
        b = "".join(rng.choices(alphabet, k=rng.randint(0, max_len)))
        pairs.append((a, b))
    return pairs


@pytest.mark.parametrize("impl", [weighted_edit_distance, _distance_python, _distance_numpy])
def test_matches_brute_force_on_random_strings(impl) -> None:
    pairs = [
        (a, b)
        for a, b in random_pairs(1000, 5, seed=0)
        if (a and b) or impl is weighted_edit_distance
    ]
    # The raw DPs are only ever called on non-empty strings.
    for a, b in pairs:
        assert impl(a, b, W) == brute_force(a, b, W), (a, b)
    # The sample is hard enough: the unit-cost recipe fails on some of these pairs.
    assert any(unit_backtrace_cost(a, b, W) != brute_force(a, b, W) for a, b in pairs)


def test_empty_strings() -> None:
    for a, b in random_pairs(50, 5, seed=5):
        assert weighted_edit_distance(a, "", W) == weighted_length(a, W)
        assert weighted_edit_distance("", b, W) == weighted_length(b, W)


def test_matches_brute_force_with_other_weights() -> None:
    odd = ImportantChars("中1", important_weight=3.5)
    unequal = {"a": 0.5, "b": 1.25, "1": 4.0, "中": 2.0}.get  # any per-character weights
    for a, b in random_pairs(200, 5, seed=1):
        assert weighted_edit_distance(a, b, odd) == brute_force(a, b, odd), (a, b)
        if set(a + b) <= set("ab1中"):
            expected = brute_force(a, b, unequal)
            assert weighted_edit_distance(a, b, unequal) == pytest.approx(expected), (a, b)


def test_python_and_numpy_agree_on_long_lines() -> None:
    # The weights are dyadic, so both must agree to the last bit (module docstring).
    for a, b in random_pairs(20, 160, seed=2):
        if a and b:
            assert _distance_numpy(a, b, W) == _distance_python(a, b, W), (a, b)
            assert weighted_edit_distance(a, b, W) == _distance_python(a, b, W), (a, b)


def test_affix_stripping_changes_nothing() -> None:
    # _distance_python never strips; it is checked against brute force above.
    rng = random.Random(3)
    for a, b in random_pairs(300, 6, seed=4):
        prefix = "".join(rng.choices("a1中", k=rng.randint(0, 3)))
        suffix = "".join(rng.choices("b¥", k=rng.randint(0, 3)))
        a, b = prefix + a + suffix, prefix + b + suffix
        if a and b:
            assert weighted_edit_distance(a, b, W) == _distance_python(a, b, W), (a, b)
    assert _strip_common_affixes("abcab", "abab") == ("c", "")
    assert _strip_common_affixes("aaa", "aa") == ("a", "")  # prefix and suffix never overlap


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("", "", 0.0),
        ("abc", "", 3.0),  # three deletions
        ("", "1a", 3.0),  # insert "1" (2) and "a" (1)
        ("a", "b", 1.0),
        ("a", "1", 2.0),  # substitution costs the larger weight
        ("12", "13", 2.0),
        ("¥5", "$5", 2.0),
        ("中文", "中", 1.0),
        ("价格12元", "价格21元", 4.0),  # two digit substitutions (a swap is not an edit)
        ("kitten", "sitting", 3.0),  # no important characters: plain Levenshtein
    ],
)
def test_hand_cases(a: str, b: str, expected: float) -> None:
    assert weighted_edit_distance(a, b, W) == expected
    assert weighted_edit_distance(b, a, W) == expected  # symmetric costs


@pytest.mark.parametrize(
    ("a", "b", "expected", "unit_path_cost"),
    [
        # Unit distance 2 (insert "1" in front, substitute the old "1" by "b"); weighted that
        # path costs 2 + 2 = 4. The cheaper alignment keeps "1": delete "a", insert "a" and
        # "b" -> 1 + 1 + 1 = 3, though it takes three unit edits.
        ("a1", "1ab", 3.0, 4.0),
        # Unit distance 2 either as two substitutions (2 + 2 = 4) or as delete "x" + insert
        # "y" around the kept "1" (1 + 1 = 2); a diagonal-first backtrace takes the former.
        ("x1", "1y", 2.0, 4.0),
        # The same trap with CJK: keep "5", move "元" around it: delete + insert = 2.
        ("元5", "5元", 2.0, 4.0),
    ],
)
def test_cases_where_weighting_unit_operations_is_wrong(
    a: str, b: str, expected: float, unit_path_cost: float
) -> None:
    assert brute_force(a, b, W) == expected
    assert weighted_edit_distance(a, b, W) == expected
    assert unit_backtrace_cost(a, b, W) == unit_path_cost != expected


def test_weighted_length_and_weights() -> None:
    assert weighted_length("a1¥中", W) == 1 + 2 + 2 + 1
    assert ImportantChars("x", 3.0)("x") == 3.0
    assert ImportantChars("x", 3.0)("y") == 1.0
    with pytest.raises(ValueError, match="important_weight"):
        ImportantChars("x", 0.0)
