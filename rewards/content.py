"""`content`: free-text answers with quantities ("The parcel weighs 2.5 kg and costs ¥30").

    reward = number_weight * N + (1 - number_weight) * S        (number_weight = 0.5)

N = 1.0 if the answer and the gold hold the same numbers as a multiset (order-free, exact
    decimals, "1,200" == "1200" == "1200.0"), else 0.0. Quantities are all-or-nothing: a
    wrong amount is wrong however similar the wording.
S = string similarity of the rest, the texts with their numbers cut out, case-folded and
    spaces collapsed: rapidfuzz's normalised Indel similarity
    1 - (insertions + deletions) / (len(a) + len(b)), in [0, 1]; two empty rests give 1.

Answer and gold go through the shared extraction (last <answer> block, else the whole text).
A None or blank solution -> None.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from rapidfuzz.distance import Indel

from rewards.answer import answer_or_text, find_numbers, remove_numbers
from rewards.per_sample import per_sample
from rewards.registry import RewardFn, register


def _rest(text: str) -> str:
    return re.sub(r"\s+", " ", remove_numbers(text)).strip().casefold()


def content_score(answer: str, gold: str, number_weight: float = 0.5) -> float:
    """number_weight * N + (1 - number_weight) * S for one answer (module docstring)."""
    numbers_match = Counter(find_numbers(answer)) == Counter(find_numbers(gold))
    similarity = Indel.normalized_similarity(_rest(answer), _rest(gold))
    return number_weight * float(numbers_match) + (1.0 - number_weight) * similarity


def make_content_reward(number_weight: float = 0.5) -> RewardFn:
    """A content reward giving `number_weight` of the score to the numbers matching."""
    if not 0.0 <= number_weight <= 1.0:
        raise ValueError(f"number_weight must be in [0, 1], got {number_weight}")

    def content_reward(completion: str, gold: str, **_: Any) -> float | None:
        if not gold.strip():
            return None  # a blank solution is a missing one
        return content_score(answer_or_text(completion), answer_or_text(gold), number_weight)

    return per_sample(content_reward, name="content")


register("content")(make_content_reward())
