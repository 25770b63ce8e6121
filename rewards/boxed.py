r"""`boxed`: exact match of the \boxed{...} content with the ground truth (GSM8K style).

reward = 1.0 if the content of the completion's last \boxed{...} equals the gold answer
after light normalisation, else 0.0 (also 0.0 when there is no complete \boxed{}).

Normalisation of both sides: strip spaces and surrounding $, drop a final period; then, if
both are numbers, compare them as exact decimals with thousands commas removed ("1,000" ==
"1000", "72.0" == "72"); otherwise compare the strings exactly.
The gold may be "72", "#### 72" (GSM8K's raw answer field: the part after the last ####),
"\boxed{72}" or "<answer>72</answer>". A None or blank solution -> None.
"""

from __future__ import annotations

from typing import Any

from rewards.answer import answer_or_text, extract_boxed, parse_number
from rewards.registry import reward


def gold_answer(solution: str) -> str:
    """The gold answer out of its usual wrappers (module docstring)."""
    text = answer_or_text(solution)
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    return text.rpartition("####")[2].strip()


def normalise_answer(text: str) -> str:
    """Spaces and surrounding $ stripped, a final period dropped: "$18$." and "$18.$" -> "18"."""
    text = text.strip().removesuffix(".").strip()  # a period after the closing $ first
    return text.strip("$").strip().removesuffix(".").strip()


def boxed_equal(answer: str, gold: str) -> bool:
    """Numeric equality when both sides are numbers, exact string equality otherwise."""
    answer, gold = normalise_answer(answer), normalise_answer(gold)
    try:
        return parse_number(answer) == parse_number(gold)
    except ValueError:
        return answer == gold


def boxed_score(completion: str, gold: str) -> float:
    r"""1.0 when the completion's last \boxed{} content matches the gold answer, else 0.0."""
    boxed = extract_boxed(completion)
    return 1.0 if boxed is not None and boxed_equal(boxed, gold_answer(gold)) else 0.0


@reward("boxed")
def boxed_reward(completion: str, gold: str, **_: Any) -> float | None:
    r"""1.0 where the last \boxed{} content matches the gold answer, else 0.0; blank gold: None."""
    if not gold.strip():
        return None  # a blank solution is a missing one
    return boxed_score(completion, gold)
