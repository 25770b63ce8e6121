"""Weighted edit distance with per-character costs: the exact minimum-cost alignment.

Costs, for a character weight w(c) > 0:
    delete c            w(c)
    insert c            w(c)
    substitute a -> b   max(w(a), w(b))      (a != b; a match costs 0)

D_w(a, b) is the minimum total cost over ALL alignments of a and b, computed by the weighted
Levenshtein recurrence over prefixes a[:i], b[:j]:

    D[i][0] = W(a[:i]),  D[0][j] = W(b[:j])            (W(s) = sum of w(c) over s)
    D[i][j] = min(D[i-1][j] + w(a_i),                   delete a_i
                  D[i][j-1] + w(b_j),                   insert b_j
                  D[i-1][j-1] + sub(a_i, b_j))          substitute / match

Note the trap this avoids: running the unit-cost Levenshtein and then summing weights along
its backtrace (or counting operations per cell) is not D_w. The unit-optimal alignment can be
weighted-suboptimal: a = "a1", b = "1ab" with w(digit) = 2 has unit distance 2
(insert "1", substitute "1" -> "b": weighted cost 4) while D_w = 3 (delete "a", keep "1",
insert "a" and "b": three unit-cost edits).

Two exact implementations of the same recurrence: a plain Python double loop for short
strings, and a NumPy one that computes a whole DP row per step for long ones (see
`_distance_numpy`); `weighted_edit_distance` picks by size. Both give identical results when
all weights are small multiples of a power of two (1.0, 2.0, 1.5 ...), since every partial
sum is then exact in float64; otherwise they may differ in the last bits.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

CharWeight = Callable[[str], float]

# From this row width on, the row-vectorised NumPy version wins (bench/rewards.py: NumPy
# pays ~10 us of call overhead per row, the Python loop ~0.15 us per cell; they cross
# between 40 and 80 characters).
NUMPY_MIN_WIDTH = 64


class ImportantChars:
    """w(c) = important_weight for c in `chars`, 1.0 otherwise (a picklable CharWeight)."""

    def __init__(self, chars: str, important_weight: float = 2.0) -> None:
        if not important_weight > 0:
            raise ValueError(f"important_weight must be > 0, got {important_weight}")
        self.chars = frozenset(chars)
        self.important_weight = float(important_weight)

    def __call__(self, c: str) -> float:
        return self.important_weight if c in self.chars else 1.0

    def __repr__(self) -> str:
        return f"ImportantChars({''.join(sorted(self.chars))!r}, {self.important_weight})"


def weighted_length(s: str, weight: CharWeight) -> float:
    """W(s) = sum of w(c) over the characters of s (= D_w(s, ""))."""
    return float(sum(weight(c) for c in s))


def weighted_edit_distance(a: str, b: str, weight: CharWeight) -> float:
    """D_w(a, b), the exact weighted edit distance (module docstring has the costs)."""
    a, b = _strip_common_affixes(a, b)
    if not a or not b:
        return weighted_length(a or b, weight)
    if len(a) > len(b):
        a, b = b, a  # D_w is symmetric; fewer, wider rows suit the NumPy version
    if len(b) >= NUMPY_MIN_WIDTH:
        return _distance_numpy(a, b, weight)
    return _distance_python(a, b, weight)


def _strip_common_affixes(a: str, b: str) -> tuple[str, str]:
    """Drop the common prefix and suffix; D_w is unchanged.

    Why exact: an optimal alignment can always match equal first characters. Any alignment
    that does not pairs them with something else at cost >= w(other) or deletes/inserts them;
    rematching them and deleting the displaced partner costs no more.
    """
    start = 0
    limit = min(len(a), len(b))
    while start < limit and a[start] == b[start]:
        start += 1
    end = 0
    while end < limit - start and a[-1 - end] == b[-1 - end]:
        end += 1
    return a[start : len(a) - end], b[start : len(b) - end]


def _distance_python(a: str, b: str, weight: CharWeight) -> float:
    """The recurrence as a double loop keeping one row; O(len(a) * len(b)) time.

    Written with plain comparisons instead of min() and max(): about 2x faster in CPython.
    """
    wb = [weight(c) for c in b]
    prev = [0.0]
    for w in wb:
        prev.append(prev[-1] + w)  # D[0][j] = W(b[:j])
    for ca in a:
        wa = weight(ca)
        left = prev[0] + wa  # D[i][0]
        row = [left]
        for cb, w_b, up, diag in zip(b, wb, prev[1:], prev[:-1], strict=True):
            cost = diag if ca == cb else diag + (wa if wa > w_b else w_b)  # substitute
            if up + wa < cost:  # delete a_i
                cost = up + wa
            if left + w_b < cost:  # insert b_j
                cost = left + w_b
            row.append(cost)
            left = cost
        prev = row
    return prev[-1]


def _distance_numpy(a: str, b: str, weight: CharWeight) -> float:
    """The same recurrence, one row at a time with NumPy.

    The row's left-to-right dependency (insertions) is a prefix minimum. With
    C[j] = W(b[:j]) and T[j] = min(delete, substitute) candidates of cell j:
        D[i][j] = min_{k <= j} (T[k] + C[j] - C[k]) = C[j] + cummin(T - C)[j]
    because a run of insertions b_{k+1..j} after cell k costs C[j] - C[k].
    """
    b_codes = np.fromiter((ord(c) for c in b), dtype=np.int64, count=len(b))  # [m]
    wb = np.fromiter((weight(c) for c in b), dtype=np.float64, count=len(b))  # [m]
    cum = np.concatenate(([0.0], np.cumsum(wb)))  # [m+1] C[j]
    prev = cum.copy()  # [m+1] D[0][:]
    for ca in a:
        wa = weight(ca)
        sub = np.where(b_codes == ord(ca), 0.0, np.maximum(wb, wa))  # [m]
        best = prev + wa  # [m+1] delete a_i
        np.minimum(best[1:], prev[:-1] + sub, out=best[1:])  # [m] or substitute
        prev = cum + np.minimum.accumulate(best - cum)  # [m+1] or insert runs
    return float(prev[-1])
