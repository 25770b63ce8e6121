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

from collections.abc import Sequence

from rewards.answer import answer_or_text, column, extract_boxed, parse_number
from rewards.registry import register


def gold_answer(solution: str) -> str:
    """The gold answer out of its usual wrappers (module docstring)."""
    text = answer_or_text(solution)
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    return text.rpartition("####")[2].strip()


def _normalise(text: str) -> str:
    return text.strip().strip("$").strip().removesuffix(".").strip()


def boxed_equal(answer: str, gold: str) -> bool:
    """Numeric equality when both sides are numbers, exact string equality otherwise."""
    answer, gold = _normalise(answer), _normalise(gold)
    try:
        return parse_number(answer) == parse_number(gold)
    except ValueError:
        return answer == gold


@register("boxed")
def boxed_reward(completions: list[str], **columns: Sequence) -> list[float | None]:
    r"""1.0 where the last \boxed{} content matches the gold answer, else 0.0."""
    solutions = column(columns, "solution", len(completions), "boxed")
    scores: list[float | None] = []
    for completion, gold in zip(completions, solutions, strict=True):
        if gold is None or not str(gold).strip():
            scores.append(None)
            continue
        boxed = extract_boxed(completion)
        matched = boxed is not None and boxed_equal(boxed, gold_answer(str(gold)))
        scores.append(1.0 if matched else 0.0)
    return scores
