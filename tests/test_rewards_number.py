"""number (the final number stated) and boxed_number (the last box) on GSM8K-style answers."""

from __future__ import annotations

import pytest

from rewards import RewardFn, get_reward, parse_reward_spec, score_completions
from rewards.number import final_number

number = get_reward("number")
boxed_number = get_reward("boxed_number")


@pytest.mark.parametrize(
    ("completion", "solution", "expected"),
    [
        ("She has 18 eggs left.", "18", 1.0),
        ("3 + 4 = 7", "7", 1.0),
        ("3 + 4 = 7", "3", 0.0),  # only the last number counts
        ("The total is 1,234.", "1234", 1.0),  # thousands commas
        ("12.0", "12", 1.0),  # equal as numbers
        ("12.5", "12", 0.0),
        ("It drops to -3 degrees", "-3", 1.0),
        ("It drops to -3 degrees", "3", 0.0),
        ("x = −3", "-3", 1.0),  # Unicode minus
        ("5-3", "3", 1.0),  # a minus between numbers is not a sign
        # Gold forms.
        ("72", "#### 72", 1.0),
        ("72", "She sold 48/2 = 24 clips.\n#### 72", 1.0),  # GSM8K's whole answer field
        ("72", r"\boxed{72}", 1.0),
        ("72", "<answer>$72$.</answer>", 1.0),
        ("1234", "#### 1,234", 1.0),
        # A final box is the answer.
        (r"so the answer is \boxed{12}.", "12", 1.0),
        (r"$\boxed{-3}$", "-3", 1.0),
        (r"\[ \boxed{12} \]", "12", 1.0),
        (r"\boxed{\boxed{5}}", "5", 1.0),
        (r"12 apples, so \boxed{twelve}", "12", 0.0),  # the box holds no number
        (r"\boxed{12} Check: 12 - 2 = 10", "12", 0.0),  # not final: 10 is the last number
        (r"maybe 7, so \boxed{12", "12", 1.0),  # unclosed box: its 12 is still the last
        ("", "12", 0.0),
        ("no idea", "12", 0.0),
    ],
)
def test_number(completion: str, solution: str, expected: float) -> None:
    assert number([completion], solution=[solution]) == [expected]


def test_final_number() -> None:
    assert final_number(r"7 then \boxed{1,000.50}") == pytest.approx(1000.5)
    assert final_number("nothing") is None


@pytest.mark.parametrize(
    ("completion", "solution", "expected"),
    [
        (r"\boxed{42}", "#### 42", 1.0),
        (r"\boxed{42}", "Half of 84.\n#### 42", 1.0),
        (r"so \boxed{42.0}.", "42", 1.0),
        (r"\boxed{1,000}", "#### 1,000", 1.0),
        (r"\boxed{$-3$}", "-3", 1.0),
        (r"\boxed{x = 42}", "42", 0.0),  # the box must hold just the number
        (r"\boxed{42} no, \boxed{41}", "42", 0.0),  # the last box counts
        (r"\boxed{41} no, \boxed{42}", "42", 1.0),
        ("42", "42", 0.0),  # no box
        (r"\boxed{42", "42", 0.0),  # unclosed
    ],
)
def test_boxed_number(completion: str, solution: str, expected: float) -> None:
    assert boxed_number([completion], solution=[solution]) == [expected]


@pytest.mark.parametrize("reward", [number, boxed_number])
def test_not_applicable_and_bad_gold(reward: RewardFn) -> None:
    assert reward([r"\boxed{1}"] * 3, solution=[None, " ", 1]) == [None, None, 1.0]
    with pytest.raises(ValueError, match="solution 'Paris' is not a number"):
        reward([r"\boxed{Paris}"], solution=["Paris"])


def test_the_rewards_spec_names_them() -> None:
    specs = parse_reward_spec("number:1.0,boxed_number:1.0")
    table, weights = score_completions(
        specs,
        [r"so \boxed{18}", "18 eggs", "17"],
        {"solution": ["#### 18"] * 3},
        ["gsm8k:1", "gsm8k:2", "gsm8k:3"],
    )
    assert table.tolist() == [[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]]
    assert weights.tolist() == [1.0, 1.0]
