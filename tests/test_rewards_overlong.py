"""overlong: DAPO's soft overlong punishment, region by region and at the boundaries."""

from __future__ import annotations

import numpy as np
import pytest

from rewards import get_reward
from rewards.overlong import make_overlong_reward, overlong_penalty

overlong = get_reward("overlong")


@pytest.mark.parametrize(
    ("length", "expected"),
    [
        # L_max = 100, L_cache = 20: free up to 80, then -1/20 per token, -1 beyond 100.
        (0, 0.0),
        (50, 0.0),
        (80, 0.0),  # last free length
        (81, -0.05),  # (80 - 81) / 20
        (90, -0.5),
        (99, -0.95),
        (100, -1.0),  # (80 - 100) / 20: the ramp meets -1 exactly at L_max
        (101, -1.0),
        (500, -1.0),
    ],
)
def test_three_regions(length: int, expected: float) -> None:
    assert overlong_penalty(length, max_length=100, buffer=20) == pytest.approx(expected)
    fixed = make_overlong_reward(max_length=100, buffer=20)
    assert fixed(["y"], completion_length=[length]) == [pytest.approx(expected)]


def test_zero_buffer_is_a_hard_cut_and_full_buffer_a_ramp_from_zero() -> None:
    assert [overlong_penalty(n, 10, 0) for n in (9, 10, 11)] == [0.0, 0.0, -1.0]
    assert [overlong_penalty(n, 10, 10) for n in (0, 1, 5, 10)] == [0.0, -0.1, -0.5, -1.0]


def test_registered_reward_reads_its_fields() -> None:
    got = overlong(
        ["a", "b", "c"],
        completion_length=[80, 90, np.int64(95)],  # numpy integers count as lengths
        max_completion_length=[100, 100, 100],
        overlong_buffer=[20, 20, 10],
        solution=[None, "x", None],  # no gold needed: every row is scored
    )
    assert got == [pytest.approx(v) for v in (0.0, -0.5, -0.5)]
    # No buffer given: L_cache = 100 // 5 = 20, so 90 tokens -> -0.5 again.
    assert overlong(["a"], completion_length=[90], max_completion_length=[100]) == [-0.5]


def test_missing_fields_and_bad_settings() -> None:
    with pytest.raises(KeyError, match="needs a 'max_completion_length' column"):
        overlong(["a"], completion_length=[3])
    with pytest.raises(KeyError, match="needs a 'completion_length' column"):
        make_overlong_reward(100, 20)(["a"])
    with pytest.raises(ValueError, match="0 <= buffer <= max_length"):
        make_overlong_reward(100, 101)
    with pytest.raises(ValueError, match="length >= 0"):
        overlong_penalty(-1, 100, 20)
    with pytest.raises(TypeError):
        overlong_penalty(12.5, 100, 20)  # type: ignore[arg-type]  # no fractional tokens
