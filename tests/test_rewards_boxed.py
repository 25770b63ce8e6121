"""boxed: the \\boxed{} content against the ground truth, GSM8K style."""

from __future__ import annotations

import pytest

from rewards import get_reward

boxed = get_reward("boxed")


@pytest.mark.parametrize(
    ("completion", "solution", "expected"),
    [
        (r"so the total is \boxed{72}.", "72", 1.0),
        (r"\boxed{72}", "#### 72", 1.0),  # GSM8K's raw answer field
        (r"\boxed{72}", "She sold 48/2 = 24 clips.\n#### 72", 1.0),
        (r"\boxed{72}", r"\boxed{72}", 1.0),
        (r"\boxed{72}", "<answer>72</answer>", 1.0),
        (r"\boxed{72.0}", "72", 1.0),  # numbers compare as numbers
        (r"\boxed{1,000}", "1000", 1.0),
        (r"\boxed{$18$}", "18", 1.0),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}", 1.0),  # otherwise exact text
        (r"\boxed{\frac12}", r"\frac{1}{2}", 0.0),  # exact match, not equivalence
        (r"\boxed{71}", "72", 0.0),
        (r"\boxed{72} no wait \boxed{73}", "72", 0.0),  # the last box counts
        # Malformed completions.
        ("72", "72", 0.0),  # no box
        (r"\boxed{72", "72", 0.0),  # unclosed
        (r"\boxed{}", "72", 0.0),
        ("", "72", 0.0),
    ],
)
def test_boxed(completion: str, solution: str, expected: float) -> None:
    assert boxed([completion], solution=[solution]) == [expected]


def test_not_applicable() -> None:
    assert boxed([r"\boxed{1}"] * 3, solution=[None, " ", "1"]) == [None, None, 1.0]
