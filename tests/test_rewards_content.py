"""content: numbers all-or-nothing (half) plus string similarity of the rest (half)."""

from __future__ import annotations

import pytest

from rewards import get_reward
from rewards.content import content_score, make_content_reward

content = get_reward("content")


@pytest.mark.parametrize(
    ("completion", "solution", "expected"),
    [
        ("3 apples", "3 apples", 1.0),
        ("<answer>3 apples</answer>", "<answer> 3 apples </answer>", 1.0),
        ("4 apples", "3 apples", 0.5),  # same words, wrong number
        ("3 APPLES", "3 apples", 1.0),  # case-folded
        ("1,200 yuan", "1200.0 yuan", 1.0),  # numbers compare as values
        ("2 and 5", "5 and 2", 1.0),  # order-free
        ("2 and 2", "2 and 5", 0.5),  # multisets differ
        # "pears" vs "apples": LCS "pes" = 3, Indel distance 5 + 6 - 2*3 = 5 -> S = 6/11.
        ("3 pears", "3 apples", 0.5 + 0.5 * 6 / 11),
        ("5 pears", "3 apples", 0.5 * 6 / 11),
        ("", "3 apples", 0.0),  # no numbers, nothing similar
        ("apples", "apples", 1.0),  # no numbers on either side: N = 1
        ("12", "12", 1.0),  # nothing but numbers: both rests empty, S = 1
    ],
)
def test_content(completion: str, solution: str, expected: float) -> None:
    assert content([completion], solution=[solution]) == [pytest.approx(expected)]


def test_weighting_and_not_applicable() -> None:
    numbers_only = make_content_reward(number_weight=1.0)
    assert numbers_only(["3 pears", "4 apples"], solution=["3 apples"] * 2) == [1.0, 0.0]
    assert content(["x", "x"], solution=[None, ""]) == [None, None]
    assert content_score("3 pears", "3 apples", number_weight=0.0) == pytest.approx(6 / 11)
    with pytest.raises(ValueError, match="number_weight"):
        make_content_reward(number_weight=1.5)
