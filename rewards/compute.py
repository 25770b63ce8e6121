"""Running the chosen reward functions over a batch, with errors that say where.

score_completions returns the raw per-function table; weighting and combining it into one
reward per completion is grpo.advantages.combine_rewards' job (NaN = not applicable).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from rewards.registry import RewardFn, get_reward


class RewardError(RuntimeError):
    """A reward function failed or returned something unusable; names function and sample."""


def score_completions(
    specs: list[tuple[str, float]],
    completions: list[str],
    columns: dict[str, list],
    where: list[str],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run every (name, weight) reward over the N completions.

    columns: each a list of N values aligned with completions, passed as keyword arguments.
    where:   N sample locations ("train.jsonl:12") for error messages.
    Returns (per_function [N, K] float32, NaN where a function returned None; weights [K]).
    Raises RewardError when a function raises, returns the wrong number of values, a
    non-number, NaN or inf (None is the only way to say "not applicable"). To name the
    sample behind an exception, the failing function is rerun one sample at a time, which
    is safe because reward functions are pure.
    """
    n = len(completions)
    if not specs:
        raise ValueError("no reward functions given")
    if len(where) != n:
        raise ValueError(f"{len(where)} sample locations for {n} completions")
    for name, values in columns.items():
        if len(values) != n:
            raise ValueError(f"column {name!r} has {len(values)} values for {n} completions")
    functions = [get_reward(name) for name, _ in specs]  # unknown names fail before any work
    per_function = torch.empty(n, len(specs), dtype=torch.float32)  # [N, K]
    for k, ((name, _), fn) in enumerate(zip(specs, functions, strict=True)):
        values = _call(name, fn, completions, columns, where)
        per_function[:, k] = torch.tensor(values, dtype=torch.float32)  # [N]
    weights = torch.tensor([w for _, w in specs], dtype=torch.float32)  # [K]
    return per_function, weights


def _call(
    name: str,
    fn: RewardFn,
    completions: list[str],
    columns: dict[str, list],
    where: list[str],
) -> list[float]:
    """fn over the batch, checked; None -> NaN."""
    try:
        out = fn(list(completions), **{k: list(v) for k, v in columns.items()})
    except Exception as e:
        raise _locate_failure(name, fn, completions, columns, where, e) from e
    if isinstance(out, (str, bytes)) or not isinstance(out, (Sequence, np.ndarray)):
        raise RewardError(
            f"reward {name!r} returned {type(out).__name__}, expected a list of "
            f"{len(completions)} floats or None (batch {_batch(where)})"
        )
    if len(out) != len(completions):
        raise RewardError(
            f"reward {name!r} returned {len(out)} values for {len(completions)} "
            f"completions (batch {_batch(where)})"
        )
    return [_check_value(name, value, place) for value, place in zip(out, where, strict=True)]


def _check_value(name: str, value: Any, place: str) -> float:
    """A returned score as a float: None -> NaN; anything unusable -> RewardError."""
    if value is None:
        return math.nan
    if not isinstance(value, numbers.Real):
        raise RewardError(
            f"reward {name!r} returned non-numeric {type(value).__name__} {value!r} "
            f"for sample {place}"
        )
    if not math.isfinite(value):
        raise RewardError(
            f"reward {name!r} returned {value} for sample {place}; "
            "return None (not NaN) where the reward does not apply"
        )
    return float(value)


def _locate_failure(
    name: str,
    fn: RewardFn,
    completions: list[str],
    columns: dict[str, list],
    where: list[str],
    error: Exception,
) -> RewardError:
    """Rerun fn one sample at a time (rewards are pure) to name the sample that fails."""
    for i, place in enumerate(where):
        try:
            fn([completions[i]], **{k: [v[i]] for k, v in columns.items()})
        except Exception as e:
            return RewardError(f"reward {name!r} failed on sample {place}: {type(e).__name__}: {e}")
    return RewardError(
        f"reward {name!r} failed on batch {_batch(where)}: {type(error).__name__}: {error}"
    )


def _batch(where: list[str]) -> str:
    """A short description of the batch for messages: first and last sample locations."""
    if not where:
        return "(empty)"
    return where[0] if len(where) == 1 else f"{where[0]} .. {where[-1]} ({len(where)} samples)"


def sample_columns(samples: Sequence[Any], group_size: int) -> tuple[dict[str, list], list[str]]:
    """The reward columns of `samples` (objects with .solution, .columns and .where), each
    repeated for its `group_size` completions: (columns, where), both N = len * group_size."""
    rows = [s for s in samples for _ in range(group_size)]
    names = sorted({key for s in samples for key in s.columns} - {"solution"})
    columns = {"solution": [s.solution for s in rows]}
    columns.update({key: [s.columns.get(key) for s in rows] for key in names})
    return columns, [s.where for s in rows]
