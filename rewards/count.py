"""`count`: the integer in <answer> equals the solution's integer (CLEVR-style counting).

reward = 1.0 if the <answer> block holds exactly one number, that number is integral and it
equals the gold integer; else 0.0. Only the <answer> block is read: a completion without
one scores 0.0 (guessing "the last number in the text" would reward rambling). "3", " 3. ",
"3.0" and "There are 3 cubes" all read as 3; "3 or 4", "three" and "3.5" read as no answer.

The gold `solution` may be "3" or "<answer>3</answer>"; a None solution -> None, and a gold
that is not a single integer is a data error (ValueError naming it).
"""

from __future__ import annotations

from typing import Any

from rewards.answer import answer_or_text, extract_answer, single_integer
from rewards.registry import reward


def gold_integer(solution: str) -> int:
    """The gold count; ValueError when the solution is not a single integer."""
    value = single_integer(answer_or_text(solution))
    if value is None:
        raise ValueError(f"count reward: solution {solution!r} is not a single integer")
    return value


@reward("count")
def count_reward(completion: str, gold: str, **_: Any) -> float | None:
    """1.0 where the answer's integer equals the gold integer, else 0.0 (module docstring)."""
    expected = gold_integer(gold)  # first: a bad gold is a data error whatever the answer
    answer = extract_answer(completion)
    got = single_integer(answer) if answer is not None else None
    return 1.0 if got == expected else 0.0
