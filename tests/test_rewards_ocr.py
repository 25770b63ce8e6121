"""The ocr reward on hand-derived numbers, malformed completions and its options."""

from __future__ import annotations

import pytest

from rewards import get_reward
from rewards.ocr import make_ocr_reward, self_reported_confidence

ocr = get_reward("ocr")


def one(completion: str, solution: str | None) -> float | None:
    return ocr([completion], solution=[solution])[0]


@pytest.mark.parametrize(
    ("completion", "solution", "expected"),
    [
        # W("a1") = 1 + 2 = 3: the normaliser is the weighted length of the reference.
        ("a1", "a1", 1.0),
        ("a2", "a1", 1 - 2 / 3),  # a wrong digit costs 2 of 3
        ("b1", "a1", 1 - 1 / 3),  # a wrong letter costs 1 of 3
        ("a", "a1", 1 - 2 / 3),  # missing digit
        ("", "a1", 0.0),  # nothing = D_w = W(ref)
        ("a1xyzw", "a1", 0.0),  # 1 - 4/3 clamped at 0
        ("¥12.50", "¥12.80", 1 - 2 / 11),  # W = 2+2+2+1+2+2 = 11, one digit off
        # W("价格: ¥12") = 1+1+1+1+2+2+2 = 10; ":" -> "：" and the lost space cost 1 each.
        ("价格：¥12", "价格: ¥12", 1 - 2 / 10),
    ],
)
def test_hand_cases(completion: str, solution: str, expected: float) -> None:
    assert one(completion, solution) == pytest.approx(expected)


def test_answer_extraction() -> None:
    solution = "<answer>a1</answer>"  # the gold goes through the same extraction
    assert one("<think>it says a1</think>\n<answer>\n a1 \n</answer>", solution) == 1.0
    assert one("<answer>zz</answer> on second thought <answer>a1</answer>", "a1") == 1.0
    assert one("  a1\n", "a1") == 1.0  # no tag: the whole completion, stripped
    # Malformed: an unclosed tag is not a tag, so the whole text is the answer.
    assert one("<answer>a1", "a1") == 0.0
    assert one("<think>a1</think>", "a1") == 0.0  # 15 characters of noise around "a1"
    assert one("<answer></answer>", "a1") == 0.0


def test_empty_reference() -> None:
    assert one("", "") == 1.0
    assert one("<answer> </answer>", "") == 1.0
    assert one("x", "") == 0.0


def test_not_applicable_and_missing_column() -> None:
    assert ocr(["a1", "a1"], solution=[None, "a1"]) == [None, 1.0]
    with pytest.raises(KeyError, match="'ocr' needs a 'solution' column"):
        ocr(["a1"], answer=["a1"])
    with pytest.raises(ValueError, match="1 values for 2 completions"):
        ocr(["a1", "b"], solution=["a1"])


def test_unknown_columns_are_ignored() -> None:
    assert ocr(["a1"], solution=["a1"], image=[object()], task=["ocr"]) == [1.0]


def test_custom_important_characters() -> None:
    reward = make_ocr_reward(important_chars="X", important_weight=3.0)
    # W("aX") = 1 + 3 = 4; "aY" substitutes X (cost max(3, 1) = 3) -> 1 - 3/4.
    assert reward(["aY", "bX", "a1"], solution=["aX"] * 3) == pytest.approx([0.25, 0.75, 0.25])
    # Digits are ordinary here: W("a1") = 2, "a2" costs 1.
    assert reward(["a2"], solution=["a1"]) == [0.5]


def test_confidence_is_off_by_default() -> None:
    assert one("<answer>a1</answer><confidence>0.1</confidence>", "a1") == 1.0


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<answer>a1</answer><confidence>0.5</confidence>", 0.5),
        ("<answer>b1</answer><confidence>0.5</confidence>", 0.5 * 2 / 3),
        ("<answer>a1</answer><confidence>0.9</confidence><confidence>0.2</confidence>", 0.2),
        # Clamped: a claimed confidence above 1 cannot raise the reward, below 0 zeroes it.
        ("<answer>b1</answer><confidence>100</confidence>", 2 / 3),
        ("<answer>a1</answer><confidence>-3</confidence>", 0.0),
        ("<answer>a1</answer>", 1.0),  # missing
        ("<answer>a1</answer><confidence>high</confidence>", 1.0),  # unreadable
        ("<answer>a1</answer><confidence>nan</confidence>", 1.0),  # not a number we read
    ],
)
def test_confidence_factor(completion: str, expected: float) -> None:
    reward = make_ocr_reward(use_confidence=True)
    assert reward([completion], solution=["a1"]) == [pytest.approx(expected)]


def test_self_reported_confidence_is_clamped() -> None:
    assert self_reported_confidence("<confidence> 1.5 </confidence>") == 1.0
    assert self_reported_confidence("<confidence>.25</confidence>") == 0.25
