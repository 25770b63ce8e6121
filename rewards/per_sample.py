"""The two shapes of a reward function, and `per_sample`, which turns the one into the other.

The registry and score_completions call a reward on a whole batch (RewardFn):

    f(completions: list[str], **columns: list) -> list[float | None]

Most rewards score each completion on its own against its row's gold answer, so they are
written for one sample (SampleFn) and `per_sample` does the batching:

    f(completion: str, gold: str | None, **fields) -> float | None

Row i is scored as f(completions[i], gold_i, **{name: column[i] for every other column}),
where gold_i is the row's `solution` as text (str(3) == "3": datasets may store numbers).

needs_gold=True (the default): the `solution` column must exist (KeyError naming the reward
otherwise), and a row whose solution is None scores None without calling f: "does not
apply". needs_gold=False (format checks, length penalties): f scores every row, with the
gold when the row has one and None otherwise. Every column must align with the completions
(ValueError naming it). Functions must accept and ignore fields they do not use (**fields).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

RewardFn = Callable[..., list[float | None]]
SampleFn = Callable[..., float | None]

GOLD_COLUMN = "solution"


def aligned_column(columns: dict[str, Sequence], name: str, n: int, reward: str) -> Sequence:
    """A reward's input column, checked to exist and to align with the n completions."""
    if name not in columns:
        raise KeyError(f"reward {reward!r} needs a {name!r} column; got columns {sorted(columns)}")
    values = columns[name]
    if len(values) != n:
        raise ValueError(
            f"reward {reward!r}: column {name!r} has {len(values)} values for {n} completions"
        )
    return values


def per_sample(fn: SampleFn, *, name: str | None = None, needs_gold: bool = True) -> RewardFn:
    """The batch reward that scores each row with fn (module docstring).

    name labels error messages (default: fn's name). The returned function carries fn's
    name and docstring, and `__wrapped__` is fn itself, for scoring one sample directly.
    """
    label = name or fn.__name__

    @functools.wraps(fn)
    def batch(completions: list[str], **columns: Sequence) -> list[float | None]:
        n = len(completions)
        if needs_gold:
            aligned_column(columns, GOLD_COLUMN, n, label)  # a missing gold column is an error
        fields = {key: aligned_column(columns, key, n, label) for key in columns}
        golds = fields.pop(GOLD_COLUMN, [None] * n)
        scores: list[float | None] = []
        for i, (completion, gold) in enumerate(zip(completions, golds, strict=True)):
            if gold is None and needs_gold:
                scores.append(None)
                continue
            row = {key: values[i] for key, values in fields.items()}
            scores.append(fn(completion, None if gold is None else str(gold), **row))
        return scores

    return batch
