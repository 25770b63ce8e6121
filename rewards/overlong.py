"""`overlong`: DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, eq. 13).

With L_max the longest completion allowed, L_cache the buffer below it and |y| the
completion's length in tokens:

             0                               if |y| <= L_max - L_cache
    R(y) =   ((L_max - L_cache) - |y|) / L_cache   if L_max - L_cache < |y| <= L_max
             -1                              if L_max < |y|

The penalty falls linearly from 0 to -1 across the buffer, so a policy drifting towards the
length limit is pushed back gradually, instead of the cliff of punishing only truncated
answers (which are often right but cut off). It is meant to be added to a task reward
(`--rewards number:1.0,overlong:1.0`). L_cache = 0 is the hard cut: 0 up to L_max, -1 beyond.
The gold is not used: every row is scored.

Fields read per row (columns the trainer supplies, one value per completion):

    completion_length      int, |y| in tokens                        required
    max_completion_length  int, L_max                                required by `overlong`
    overlong_buffer        int, L_cache; absent: L_max // 5          read by `overlong`

`make_overlong_reward(max_length, buffer)` fixes L_max and L_cache and reads only
completion_length. The default buffer of a fifth of L_max is DAPO's ratio (4096 of 20480).
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

from rewards.per_sample import per_sample
from rewards.registry import RewardFn, reward

LENGTH_FIELD = "completion_length"
MAX_LENGTH_FIELD = "max_completion_length"
BUFFER_FIELD = "overlong_buffer"
DEFAULT_BUFFER_FRACTION = 5  # L_cache = L_max // 5 when no buffer is given


def overlong_penalty(length: int, max_length: int, buffer: int) -> float:
    """R(y) of the module docstring for |y| = length, L_max = max_length, L_cache = buffer."""
    length, max_length, buffer = _checked_lengths(length, max_length, buffer)
    free = max_length - buffer  # lengths up to here are not punished
    if length <= free:
        return 0.0
    if length <= max_length:  # here buffer > 0, since free < length <= max_length
        return (free - length) / buffer
    return -1.0


def _checked_lengths(length: int, max_length: int, buffer: int) -> tuple[int, int, int]:
    """The three as ints (operator.index: numpy or torch integers pass, 12.5 tokens do not),
    checked for length >= 0, max_length >= 1 and 0 <= buffer <= max_length."""
    length, max_length, buffer = (operator.index(v) for v in (length, max_length, buffer))
    if length < 0 or max_length < 1 or not 0 <= buffer <= max_length:
        raise ValueError(
            f"overlong reward: need length >= 0, max_length >= 1 and 0 <= buffer <= "
            f"max_length; got length {length}, max_length {max_length}, buffer {buffer}"
        )
    return length, max_length, buffer


def _field(fields: Mapping[str, Any], name: str) -> Any:
    """fields[name]; a KeyError that says the trainer must pass it per row."""
    if name not in fields:
        raise KeyError(f"reward 'overlong' needs a {name!r} column (one value per completion)")
    return fields[name]


def make_overlong_reward(max_length: int, buffer: int) -> RewardFn:
    """An overlong reward with fixed L_max = max_length and L_cache = buffer."""
    _checked_lengths(0, max_length, buffer)  # a bad setting fails now, not at the first batch

    def overlong_reward(completion: str, gold: str | None, **fields: Any) -> float | None:
        return overlong_penalty(_field(fields, LENGTH_FIELD), max_length, buffer)

    return per_sample(overlong_reward, name="overlong", needs_gold=False)


@reward("overlong", needs_gold=False)
def overlong_reward(completion: str, gold: str | None, **fields: Any) -> float | None:
    """R(y) with L_max and L_cache taken from the row's fields (module docstring)."""
    max_length = _field(fields, MAX_LENGTH_FIELD)
    buffer = fields.get(BUFFER_FIELD)
    if buffer is None:
        buffer = operator.index(max_length) // DEFAULT_BUFFER_FRACTION
    return overlong_penalty(_field(fields, LENGTH_FIELD), max_length, buffer)
