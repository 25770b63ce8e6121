"""Evaluation metrics for text recognition: text accuracy, character error rate, exact match.

All three count characters (Unicode code points) with the plain, unweighted Levenshtein
distance d(p, l): the fewest single-character insertions, deletions and substitutions that
turn the prediction p into the label l. (The training reward in rewards/ocr.py weights some
characters double; these metrics do not, so they compare with published numbers.)

    text accuracy  (per sample)  1 - d(p, l) / max(|p|, |l|),  and 1 when p == l == ""
                   This is the ms-swift OCR recipe's score: in [0, 1] whatever the lengths,
                   so an overlong prediction cannot push it below 0.
    CER            (per corpus)  sum_i d(p_i, l_i) / sum_i |l_i|
                   Pooled rather than averaged per sample, so long lines weigh more; it can
                   exceed 1 when predictions are longer than the labels. A corpus whose labels
                   are all empty divides by 1 instead of 0.
    exact match    (per sample)  1 if p == l else 0

Worked example: p = "abd", l = "abc": d = 1, text accuracy = 1 - 1/3 = 2/3, CER = 1/3.
p = "a", l = "abcd": d = 3, text accuracy = 1 - 3/4 = 1/4, CER = 3/4.
"""

from __future__ import annotations

from collections.abc import Sequence

from rapidfuzz.distance import Levenshtein


def edit_distance(prediction: str, label: str) -> int:
    """Unweighted Levenshtein distance over characters."""
    return int(Levenshtein.distance(prediction, label))


def text_accuracy(prediction: str, label: str) -> float:
    """1 - d(p, l) / max(|p|, |l|); both empty -> 1.0."""
    longest = max(len(prediction), len(label))
    if longest == 0:
        return 1.0
    return 1.0 - edit_distance(prediction, label) / longest


def exact_match(prediction: str, label: str) -> float:
    """1.0 when the strings are identical, else 0.0."""
    return 1.0 if prediction == label else 0.0


def character_error_rate(predictions: Sequence[str], labels: Sequence[str]) -> float:
    """sum_i d(p_i, l_i) / sum_i |l_i| over the corpus (denominator at least 1)."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    errors = sum(edit_distance(p, g) for p, g in zip(predictions, labels, strict=True))
    return errors / max(1, sum(len(label) for label in labels))


def ocr_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """{"text_accuracy", "cer", "exact_match"} over a corpus; the per-sample ones averaged."""
    if not labels:
        raise ValueError("no samples to score")
    cer = character_error_rate(predictions, labels)
    pairs = list(zip(predictions, labels, strict=True))
    return {
        "text_accuracy": sum(text_accuracy(p, g) for p, g in pairs) / len(pairs),
        "cer": cer,
        "exact_match": sum(exact_match(p, g) for p, g in pairs) / len(pairs),
    }
