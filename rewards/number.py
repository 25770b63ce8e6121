r"""`number` and `boxed_number`: numeric answers (GSM8K-style arithmetic), 1.0 / 0.0.

`number`:       reward = 1.0 if F(completion) == gold number, else 0.0
`boxed_number`: reward = 1.0 if the last complete \boxed{...} holds exactly a number equal
                to the gold number, else 0.0 (no box, or "x = 12" in it: 0.0)

F, the final number the completion states: when the completion ends with a \boxed{...}
(nothing but spaces, $, periods and closing brackets after it), the last number inside that
box; otherwise the last number anywhere in the completion. A final box without a number
("\boxed{twelve}") gives no number: the box is the answer, whatever came before it.
`number` is the partial-credit version for small models that rarely fill a box:
"... so she has 18 eggs." earns what "\boxed{18}" earns.

Numbers are read as in rewards/answer.py and compared as exact decimals: "1,234" == "1234",
"12.0" == "12", "-3" and "−3" are negative, "5-3" reads as 5 and 3.
The gold may be "12", "-3", "#### 12" (GSM8K's answer field, reasoning before the #### too),
"\boxed{12}" or "<answer>12</answer>", with $ or a final period around the number. A None or
blank gold -> None; a gold that is not a number is a data error (ValueError naming it).

`boxed_number` is the built-in `boxed` (rewards/boxed.py), which already compares numbers as
numbers and reads "#### 42" golds, restricted to numeric golds: where `boxed` would fall
back to comparing text, a non-numeric gold here is an error.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from rewards.answer import find_numbers, parse_number, trailing_boxed
from rewards.boxed import boxed_score, gold_answer, normalise_answer
from rewards.registry import reward


def gold_number(solution: str) -> Decimal:
    """The gold as an exact number; ValueError when it is not one (module docstring)."""
    try:
        return parse_number(normalise_answer(gold_answer(solution)))
    except ValueError:
        raise ValueError(f"number reward: solution {solution!r} is not a number") from None


def final_number(completion: str) -> Decimal | None:
    """F(completion): the final number stated (module docstring); None when there is none."""
    box = trailing_boxed(completion)
    numbers = find_numbers(completion if box is None else box)
    return numbers[-1] if numbers else None


@reward("number")
def number_reward(completion: str, gold: str, **_: Any) -> float | None:
    """1.0 where the final number stated equals the gold number, else 0.0; blank gold: None."""
    if not gold.strip():
        return None  # a blank solution is a missing one
    return 1.0 if final_number(completion) == gold_number(gold) else 0.0


@reward("boxed_number")
def boxed_number_reward(completion: str, gold: str, **_: Any) -> float | None:
    r"""1.0 where the last \boxed{} holds the gold number, else 0.0; blank gold: None."""
    if not gold.strip():
        return None  # a blank solution is a missing one
    gold_number(gold)  # numeric golds only: `boxed` would compare a text gold as text
    return boxed_score(completion, gold)
