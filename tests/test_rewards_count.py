"""count: the integer in <answer> against the solution's integer."""

from __future__ import annotations

import pytest

from rewards import get_reward

count = get_reward("count")


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>I see 3 cubes</think><answer>3</answer>", 1.0),
        ("<answer> 3. </answer>", 1.0),
        ("<answer>There are 3 objects.</answer>", 1.0),
        ("<answer>3.0</answer>", 1.0),
        ("<answer>4</answer>", 0.0),
        ("<answer>3 or 4</answer>", 0.0),  # two numbers: no answer
        ("<answer>three</answer>", 0.0),  # digits only
        ("<answer>3.5</answer>", 0.0),
        ("<answer>2</answer> wait <answer>3</answer>", 1.0),  # the last block counts
        # Only <answer> is read: no block, or an unclosed one, scores 0.
        ("3", 0.0),
        ("The answer is 3", 0.0),
        ("<answer>3", 0.0),
        ("", 0.0),
    ],
)
def test_count(completion: str, expected: float) -> None:
    assert count([completion], solution=["3"]) == [expected]


def test_gold_forms_and_not_applicable() -> None:
    got = count(["<answer>3</answer>"] * 3, solution=["<answer> 3 </answer>", 3, None])
    assert got == [1.0, 1.0, None]


def test_gold_that_is_not_an_integer_is_an_error() -> None:
    with pytest.raises(ValueError, match="solution 'three' is not a single integer"):
        count(["<answer>3</answer>"], solution=["three"])
