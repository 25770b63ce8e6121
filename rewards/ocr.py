"""`ocr`: a character-level reward for text recognition, with some characters counting double.

    reward = max(0, 1 - D_w(answer, ref) / W(ref))

D_w is the exact weighted edit distance of rewards/edit_distance.py with
w(c) = important_weight (2.0) for important characters (digits, ¥, $ by default) and 1.0
otherwise. The normaliser W(ref) is the WEIGHTED length of the reference, sum of w(c) over
its characters, not its character count: D_w(empty answer, ref) = W(ref), so reward 0 means
"as bad as writing nothing" whatever the mix of characters, and one wrong digit in "12"
costs half the reward instead of all of it. Example: ref "a1" (W = 3), answer "a2" -> D_w =
2 -> reward 1/3; answer "b1" -> D_w = 1 -> reward 2/3.

The answer is the last <answer>...</answer> block's content, else the whole completion,
stripped (rewards/answer.py); the gold `solution` goes through the same rule. An empty
reference scores 1 for an empty answer and 0 otherwise. A None solution -> None.

Optional self-reported confidence (off by default): the completion may end with
<confidence>0.8</confidence>; the reward is multiplied by that number clamped to [0, 1]
(missing or unreadable -> 1; put the answer in <answer> tags so the confidence tag is not
read as part of it). Clamped, the factor can only lower the reward; unclamped, a
policy would learn to print <confidence>100</confidence> and inflate its own reward.
"""

from __future__ import annotations

import re
from typing import Any

from rewards.answer import answer_or_text
from rewards.edit_distance import ImportantChars, weighted_edit_distance, weighted_length
from rewards.per_sample import per_sample
from rewards.registry import RewardFn, register

DEFAULT_IMPORTANT_CHARS = "0123456789¥$"

_CONFIDENCE = re.compile(r"<confidence>\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+))\s*</confidence>")


def ocr_score(answer: str, reference: str, weight: ImportantChars) -> float:
    """max(0, 1 - D_w(answer, reference) / W(reference)); 1/0 for an empty reference."""
    if not reference:
        return 1.0 if not answer else 0.0
    distance = weighted_edit_distance(answer, reference, weight)
    return max(0.0, 1.0 - distance / weighted_length(reference, weight))


def self_reported_confidence(completion: str) -> float:
    """The last <confidence>x</confidence> number clamped to [0, 1]; 1.0 when absent."""
    matches = _CONFIDENCE.findall(completion)
    if not matches:
        return 1.0
    return min(1.0, max(0.0, float(matches[-1])))


def make_ocr_reward(
    important_chars: str = DEFAULT_IMPORTANT_CHARS,
    important_weight: float = 2.0,
    use_confidence: bool = False,
) -> RewardFn:
    """An OCR reward with its own important characters and weight (module docstring)."""
    weight = ImportantChars(important_chars, important_weight)

    def ocr_reward(completion: str, gold: str, **_: Any) -> float | None:
        score = ocr_score(answer_or_text(completion), answer_or_text(gold), weight)
        return score * self_reported_confidence(completion) if use_confidence else score

    return per_sample(ocr_reward, name="ocr")


register("ocr")(make_ocr_reward())
